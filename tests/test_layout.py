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

from splitnet.v1 import split_pb2

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


# The SplitLearning messages are built in `splitnet.serde` alone (Tensors in `splitnet.codec`), so that
# what one end writes and the other reads is one mapping, pinned by a round trip (tests/test_serde.py).
# Parsing bytes with `pb.X.FromString` is what gRPC's stubs do and is no building: the proxy does it and
# converts with serde. Tests are outside the rule: they forge what a hostile peer sends, which no serde
# value can express.
MESSAGES = set(split_pb2.DESCRIPTOR.message_types_by_name)
MESSAGE_BUILDERS = {ROOT / "splitnet" / "serde.py", ROOT / "splitnet" / "codec.py"}
SPLIT_PB2 = {(0, "splitnet.v1.split_pb2"), (1, "v1.split_pb2")}  # (import level, module): inside splitnet, relative


def message_constructions(source: str) -> list[tuple[int, str]]:
    """(line, message) of every call of a `splitnet.v1.split_pb2` message class, however it was imported."""
    tree = ast.parse(source)
    modules, classes = set(), {}  # names bound to split_pb2; names bound to its message classes
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names if (0, alias.name) in SPLIT_PB2}
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (node.level, f"{node.module}.{alias.name}" if node.module else alias.name) in SPLIT_PB2:
                    modules.add(alias.asname or alias.name)
                elif (node.level, node.module) in SPLIT_PB2 and alias.name in MESSAGES:
                    classes[alias.asname or alias.name] = alias.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            owner, _, last = name.rpartition(".")
            if owner in modules and last in MESSAGES:
                found.append((node.lineno, last))
            elif not owner and last in classes:
                found.append((node.lineno, classes[last]))
    return sorted(found)


def dotted(node: ast.expr) -> str:
    """`a.b.c` for a chain of names and attributes, '' for anything else (a call's result, a subscript)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = dotted(node.value)
        return f"{owner}.{node.attr}" if owner else ""
    return ""


def test_only_serde_and_the_codec_build_messages() -> None:
    files = [path for path in SOURCES if path not in MESSAGE_BUILDERS
             and not {ROOT / "tests", ROOT / "splitnet" / "v1"} & set(path.parents)]
    assert ROOT / "edge_client" / "remote.py" in files and ROOT / "benchmarks" / "soak.py" in files
    bad = [f"{path.relative_to(ROOT)}:{line} builds {message} (convert with splitnet.serde)" for path in files
           for line, message in message_constructions(path.read_text())]
    assert not bad, "\n".join(bad)


def test_the_message_check_sees_each_way_of_building_one() -> None:
    source = ("from splitnet.v1 import split_pb2 as pb\nimport splitnet.v1.split_pb2\n"
              "from splitnet.v1.split_pb2 import TrainStep as Step, DType\nfrom splitnet import serde\n"
              "pb.SessionSpec(job='j')\n"
              "splitnet.v1.split_pb2.FlushReply()\n"
              "Step(step_id=1)\n"
              "def late():\n    from .v1 import split_pb2\n    return split_pb2.Tensor()\n"
              "pb.TrainStep.FromString(raw)\npb.DType.Name(1)\nDType.Value('INT8')\npb.DESCRIPTOR\n"
              "serde.TrainStep('', 1, features, [])\nserde.session_spec_to_proto(spec)\nother.TrainStep()\n")
    assert message_constructions(source) == [(5, "SessionSpec"), (6, "FlushReply"), (7, "TrainStep"), (10, "Tensor")]
