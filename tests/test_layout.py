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
