"""No role imports another role: what two roles share lives in `splitnet`.

A role (edge_client, cloud_server, attacks) that imports another drags that role's
dependencies and start-up cost along and couples two programs that are deployed apart:
an attacker that needs the edge's package, a server that needs the attacker's. The
pieces they agree on (the tap's record format, the obfuscation chain, the checkpoint
file format) are contracts and belong to the shared package. Beyond the roles: `cem` is
a pure algorithm (torch only) that the edge uses, `splitnet` depends on no role and not
on `cem`, and `deploy` orchestrates everything, so it may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"edge_client", "cloud_server", "attacks", "cem", "splitnet", "deploy"}
ALLOWED = {  # project packages each package may import, besides itself
    "edge_client": {"splitnet", "cem"},
    "cloud_server": {"splitnet"},
    "attacks": {"splitnet"},
    "splitnet": set(),
    "cem": set(),
}


def project_imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import, wherever it sits (function-level ones too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their package
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PROJECT]
    return found


def violations(package: str, files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        for line, target in project_imports(path.read_text()):
            if target != package and target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    bad = violations(package, files)
    assert not bad, "\n".join(bad)


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    module = tmp_path / "mod.py"
    module.write_text("import attacks.capture\nfrom edge_client.defense import X\nimport numpy\n"
                      "def late():\n    from cloud_server import checkpoints\n    from . import sibling\n")
    assert project_imports(module.read_text()) == [(1, "attacks"), (2, "edge_client"), (5, "cloud_server")]


# argparse's private attributes and classes: they change between Python releases (3.12 reworked
# the subparsers' internals), so the project reads a parser's flags through splitnet.cli_util.Parser.
ARGPARSE_PRIVATE = {"_actions", "_option_string_actions", "_remove_action", "_action_groups", "_group_actions",
                    "_subparsers", "_name_parser_map", "_defaults", "_registries", "_add_action",
                    "_mutually_exclusive_groups", "_get_positional_actions", "_get_optional_actions"}
SOURCES = sorted(path for folder in (*PROJECT, "tests", "benchmarks", "examples")
                 for path in (ROOT / folder).rglob("*.py"))


def argparse_internals(source: str) -> list[tuple[int, str]]:
    """(line, what) of every use of argparse's private names: `argparse._X`, the private attributes
    of a parser or group, and a parser's `error` replaced at run time (subclass it instead)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "argparse" and node.attr.startswith("_"):
                found.append((node.lineno, f"argparse.{node.attr}"))
            elif node.attr in ARGPARSE_PRIVATE:
                found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Assign):
            found += [(node.lineno, "parser.error replaced") for target in node.targets
                      if isinstance(target, ast.Attribute) and target.attr == "error"
                      and isinstance(target.value, ast.Name) and target.value.id.endswith(("parser", "p"))]
    return sorted(found)


def test_no_module_uses_argparse_internals() -> None:
    assert SOURCES
    bad = [f"{path.relative_to(ROOT)}:{line} uses {what}" for path in SOURCES
           for line, what in argparse_internals(path.read_text())]
    assert not bad, "\n".join(bad)


def test_the_argparse_check_sees_each_kind_of_use() -> None:
    source = ("import argparse\nisinstance(a, argparse._SubParsersAction)\nparser._option_string_actions.pop(k)\n"
              "p._remove_action(a)\nsub_parser.error = fail\nclient.error = text\nargparse.ArgumentParser()\n")
    assert argparse_internals(source) == [(2, "argparse._SubParsersAction"), (3, "._option_string_actions"),
                                          (4, "._remove_action"), (5, "parser.error replaced")]
