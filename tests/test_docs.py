"""Every document the repository points at exists in the repository.

A citation to a file that a clone does not have (a spec kept elsewhere, a renamed page)
sends the reader nowhere; these tests make such a reference fail when it is written:
- relative links and images in the tracked Markdown files;
- `NAME.md` / `docs/NAME.md` mentioned in the comments and strings of Python files,
  and the section numbers (`docs/CEM.md §2.4`) they cite, against the headings there.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "out", "runs"}
# Markdown files the programs write into their output folders: a mention names an output, not a document
GENERATED = {"report.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# `docs/CEM.md`, `README.md`, or a section cited by a capitalised stem alone (`CEM_SPEC §2.4`)
DOC_REF = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md|(?:[\w.-]+/)*[A-Z][A-Z0-9_]{2,}(?=\s*(?:§|section\s+\d)))"
                     r"\b(?:\s*(?:§|section\s+)(\d+(?:\.\d+)*))?")
HEADING_NUMBER = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def repo_files() -> set[str]:
    """Paths (relative, '/'-separated) a commit of this work tree would hold.

    git's view (tracked plus untracked-but-not-ignored) where there is a checkout, so
    that ignored outputs never satisfy a reference; otherwise a walk without the
    virtual environment and build outputs.
    """
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        return {p for p in out.split("\0") if p and (ROOT / p).exists()}
    except (OSError, subprocess.SubprocessError):
        found = set()
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            found.update((Path(folder) / f).relative_to(ROOT).as_posix() for f in files)
        return found


FILES = repo_files()


def markdown_links(text: str) -> list[str]:
    """Link and image targets outside code blocks and inline code (examples there are not links)."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))


def broken_links(md_path: str, text: str, files: set[str]) -> list[str]:
    bad = []
    for target in markdown_links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # external (http:, mailto:) or an anchor in the same page
        path = target.split("#", 1)[0]
        resolved = os.path.normpath((Path(md_path).parent / path).as_posix()).replace(os.sep, "/")
        if resolved not in files and not any(f.startswith(resolved.rstrip("/") + "/") for f in files):
            bad.append(f"{md_path}: [..]({target}) -> {resolved} does not exist")
    return bad


def code_text(source: str) -> str:
    """The comments and string literals (docstrings included) of a Python source."""
    parts = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            parts.append(tok.string)
    return "\n".join(parts)


def resolve_doc(name: str, files: set[str]) -> str | None:
    """The repository file a reference names: a path from the root, or a bare name if unique."""
    if name in files:
        return name
    matches = [f for f in files if f.endswith("/" + name) or f == name]
    return matches[0] if len(matches) == 1 else None


def broken_doc_refs(py_path: str, source: str, files: set[str], read=lambda p: (ROOT / p).read_text()) -> list[str]:
    bad = []
    for name, section in DOC_REF.findall(code_text(source)):
        name = name if name.endswith(".md") else name + ".md"
        if Path(name).name in GENERATED:
            continue
        target = resolve_doc(name, files)
        if target is None:
            bad.append(f"{py_path}: cites {name}, which is not a file of the repository")
        elif section and section not in HEADING_NUMBER.findall(read(target)):
            bad.append(f"{py_path}: cites {name} §{section}, which has no heading numbered {section}")
    return bad


def test_relative_markdown_links_point_to_files_in_the_repository() -> None:
    docs = sorted(f for f in FILES if f.endswith(".md"))
    assert "README.md" in docs and "docs/CEM.md" in docs  # the scan sees the documents at all
    bad = [err for md in docs for err in broken_links(md, (ROOT / md).read_text(), FILES)]
    assert not bad, "\n".join(bad)


def test_code_comments_cite_only_documents_in_the_repository() -> None:
    # this file's own strings are the checkers' examples, missing files on purpose
    sources = sorted(f for f in FILES if f.endswith(".py") and f != "tests/test_docs.py")
    assert "cem/merge.py" in sources
    bad = [err for py in sources for err in broken_doc_refs(py, (ROOT / py).read_text(), FILES)]
    assert not bad, "\n".join(bad)


def test_readme_links_the_design_documents() -> None:
    linked = {os.path.normpath(t.split("#")[0]) for t in markdown_links((ROOT / "README.md").read_text())}
    for doc in ("docs/CEM.md", "docs/ATTACKS_AND_METRICS.md", "docs/ARCHITECTURE.md"):
        assert doc in linked, f"README.md does not link {doc}"


# The checkers themselves must catch what they are for: a check that finds nothing passes too.

FAKE = {"README.md", "docs/CEM.md", "docs/img/a.png", "pkg/mod.py"}


@pytest.mark.parametrize("text, broken", [
    ("see [cem](docs/CEM.md) and [§2](docs/CEM.md#2-gated) and ![](docs/img/a.png)", []),
    ("[web](https://example.org/x.md) [mail](mailto:a@b) [here](#top)", []),
    ("[spec](CEM_SPEC.md)", ["CEM_SPEC.md"]),
    ("[up](../README.md)", ["../README.md"]),
    ("```\n[not a link](missing.md)\n```\nand `[code](missing.md)`", []),
    ('[titled](docs/GONE.md "a title")', ["docs/GONE.md"]),
])
def test_broken_links_checker(text: str, broken: list[str]) -> None:
    found = broken_links("README.md", text, FAKE)
    assert len(found) == len(broken) and all(b in f for b, f in zip(broken, found)), found


def test_broken_links_resolve_from_the_linking_file() -> None:
    assert broken_links("docs/CEM.md", "[readme](../README.md) [img](img/a.png)", FAKE) == []
    assert broken_links("docs/CEM.md", "[readme](README.md)", FAKE)  # docs/README.md does not exist


@pytest.mark.parametrize("source, broken", [
    ('"""The math is CEM_SPEC.md."""\n', ["CEM_SPEC.md"]),
    ("x = 1  # see docs/ATTACKS_AND_METRICS.md\n", ["docs/ATTACKS_AND_METRICS.md"]),
    ('"""See docs/CEM.md §2.4 and CEM.md section 3."""\n', []),
    ('"""See docs/CEM.md §9."""\n', ["§9"]),
    ('"""The gates of CEM_SPEC §2.4, see also CEM section 3."""\n', ["CEM_SPEC.md"]),
    ('path = out / "report.md"  # written by the sweep\n', []),
    ("name = 'cem.md'.upper()  # no file of that name\n", ["cem.md"]),
])
def test_doc_reference_checker(source: str, broken: list[str]) -> None:
    cem_md = "# CEM\n## 2. Gated\n### 2.4 Gates\n## 3. Slot\n"
    found = broken_doc_refs("pkg/mod.py", source, FAKE, read=lambda _: cem_md)
    assert len(found) == len(broken) and all(b in f for b, f in zip(broken, found)), found
