"""The layout's rules (docs/ARCHITECTURE.md §2 and §7), checked on every import the sources make.

No role imports another role: what two roles share lives in `splitnet`.
A role (edge_client, cloud_server, attacks) that imports another drags that role's
dependencies and start-up cost along and couples two programs that are deployed apart:
an attacker that needs the edge's package, a server that needs the attacker's. The
pieces they agree on (the tap's record format, the obfuscation chain, the checkpoint
file format, the inverse network both the attacker and the edge's simulated attacker
train) are contracts and belong to the shared package. Beyond the roles: `cem` is
a pure algorithm (torch only) that the edge uses, `splitnet` depends on no role and not
on `cem`, and `deploy` orchestrates everything, so it may import any role.

Inside `deploy`, each room imports only itself and what its entry in ROOMS names (the
simulation never the experiments; the experiments only the simulation's Ray settings).
Anywhere in the project: no import circle (function-level imports count: they run too),
and no library module imports a command module (a console script's, a `python -m` one's),
except where COMMAND_IMPORTS_ALLOWED says why. Only `splitnet.serde` and `splitnet.codec`
build SplitLearning messages (§3).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
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


# --- the module graph: every project module and the project modules it imports -----------------------------

def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT, packages=PROJECT) -> dict[str, Path]:
    return {module_name(path, root): path for package in sorted(packages)
            for path in sorted((root / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules) -> list[tuple[int, str]]:
    """(line, module) of every project module that module `name` imports, wherever the import sits
    (function-level ones too): the deepest module each name reaches (`from P import N`: P.N where that
    is a module, else P), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                found.append((node.lineno, target))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it loads: the line of the import}. Importing a.b.c loads the packages a and a.b
    as well, unless they are the importer's own (already loaded before it runs)."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for line, target in imports_of(name, path, modules):
            parts = target.split(".")
            for loaded in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                if loaded in modules and loaded != name and not name.startswith(loaded + "."):
                    edges.setdefault(loaded, line)
    return graph


def import_circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): each holds an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(circles)


MODULES = project_modules()
GRAPH = import_graph(MODULES)


def test_no_import_circle_anywhere() -> None:
    """An import circle is two modules that cannot be understood, tested or moved apart, and one import
    reordered away from a partly initialised module; a function-level import only hides it."""
    bad = [" <-> ".join(group) + ": " + ", ".join(f"{MODULES[a].relative_to(ROOT)}:{line} imports {b}"
                                                  for a in group for b, line in GRAPH[a].items() if b in group)
           for group in import_circles(GRAPH)]
    assert not bad, "\n".join(bad)


def test_the_circle_check_finds_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for path, text in {"__init__.py": "", "a.py": "def later():\n    from pkg import b\n",
                       "b.py": "from .sub.c import thing\n", "sub/__init__.py": "", "sub/c.py": "from .. import a\n",
                       "d.py": "import pkg.a\nimport numpy\n"}.items():
        (pkg / path).write_text(text)
    modules = project_modules(tmp_path, {"pkg"})
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b": 2} and graph["pkg.b"] == {"pkg.sub": 1, "pkg.sub.c": 1}
    assert graph["pkg.d"] == {"pkg.a": 1}
    assert import_circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "a.py").write_text("")
    assert import_circles(import_graph(project_modules(tmp_path, {"pkg"}))) == []


# --- deploy's rooms (docs/ARCHITECTURE.md §7) --------------------------------------------------------------

# A deploy module may import the modules of its own room and those its room names here (a name covers
# the modules under it); any role besides.
ROOMS = {
    "deploy": set(),  # the package itself: a docstring
    "deploy.processes": set(),
    "deploy.link_profiles": set(),
    "deploy.link": {"deploy.link_profiles"},
    "deploy.sim": {"deploy.processes"},
    # the experiments run points as Ray tasks with the simulation's Ray settings, and nothing else of it
    "deploy.experiments": {"deploy.processes", "deploy.link_profiles", "deploy.sim.config"},
}
# Old paths kept for one release: each runs its command under `python -m`, gives its names to an import,
# and imports nothing else.
ALIASES = {"deploy.plan": "deploy.experiments.plan", "deploy.ray_cli": "deploy.sim.cli"}


def room_of(module: str) -> str | None:
    rooms = [room for room in ROOMS if module == room or module.startswith(room + ".")]
    return max(rooms, key=len) if rooms and module not in ALIASES else None


def within(module: str, names) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def test_every_deploy_module_is_in_a_room() -> None:
    deploy = [name for name in MODULES if within(name, {"deploy"})]
    assert "deploy.sim.run" in deploy and "deploy.experiments.runner" in deploy
    homeless = [name for name in deploy if room_of(name) is None and name not in ALIASES]
    assert not homeless, f"give these a room in ROOMS (and docs/ARCHITECTURE.md §7): {homeless}"
    # the package's room holds the package alone: a module beside the rooms gets a room of its own
    assert [name for name in deploy if room_of(name) == "deploy"] == ["deploy"]


def test_each_deploy_room_imports_only_itself_and_what_it_may() -> None:
    bad = []
    for name, path in MODULES.items():
        room = room_of(name)
        if room is None:
            continue
        allowed = {room} if room != "deploy" else set()
        for line, target in imports_of(name, path, MODULES):
            if within(target, {"deploy"}) and not within(target, allowed | ROOMS[room]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (room {room} may import "
                           f"{sorted(ROOMS[room]) or 'no other room'})")
    assert not bad, "\n".join(bad)


def test_the_simulation_does_not_import_the_experiments() -> None:
    sim = [(name, target) for name in MODULES if within(name, {"deploy.sim"})
           for _, target in imports_of(name, MODULES[name], MODULES) if within(target, {"deploy.experiments"})]
    assert not sim


def test_the_simulation_settings_import_no_ray() -> None:
    """The one module of the simulation the experiments use is the one that loads no Ray: Ray reads
    some of its settings from the environment when it is imported, so they are set first."""
    nodes = list(ast.walk(ast.parse(MODULES["deploy.sim.config"].read_text())))
    names = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    assert "edge_client.config" in names and not [name for name in names if name.split(".")[0] == "ray"]


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_old_path_is_a_thin_alias_that_runs_its_command(alias: str) -> None:
    target = ALIASES[alias]
    assert {t for _, t in imports_of(alias, MODULES[alias], MODULES)} == {target}
    assert alias in COMMANDS and target in COMMANDS
    done = subprocess.run([sys.executable, "-m", alias, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and f"`python -m {alias}` is deprecated" in done.stderr
    assert f"python -m {target}" in done.stderr


# --- command modules are imported by commands only ---------------------------------------------------------

def command_modules(modules: dict[str, Path], scripts: dict[str, str]) -> set[str]:
    """The modules a command runs: those console `scripts` name (`module:function`), each `__main__`,
    and each module that runs under `python -m` (an `if __name__ == "__main__":` block)."""
    def runs_as_main(path: Path) -> bool:
        return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                   and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
                   and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
                   for node in ast.parse(path.read_text()).body)

    return ({target.partition(":")[0] for target in scripts.values()}
            | {name for name, path in modules.items() if name.endswith("__main__") or runs_as_main(path)})


SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = command_modules(MODULES, SCRIPTS)
# (library module, command module it imports): why. A command module's job is the command line
# (flags, messages, exit codes); a library that imports one takes its argparse setup and its imports
# along, and a command cannot be rewritten without breaking a library.
COMMAND_IMPORTS_ALLOWED = {
    ("deploy.experiments.config", "edge_client.cli"):
        "a sweep's [model] keys are edge-client's flags, read and checked by edge-client's own parser",
    ("deploy.experiments.config", "attacks.cli"):
        "a sweep's [attack] keys are `attacker run`'s flags, read and checked by the attacker's own parser",
}


def command_imports(modules: dict[str, Path], commands: set[str]) -> list[tuple[str, int, str]]:
    """(library module, line, command module) of each import of a command module by a module that is not one."""
    return [(name, line, target) for name, path in modules.items() if name not in commands
            for line, target in imports_of(name, path, modules) if target in commands]


def test_every_console_script_names_a_main_of_a_project_module() -> None:
    assert {"split-ray", "split-sweep", "split-plan", "split-demo", "split-link"} <= set(SCRIPTS)
    for script, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        assert module in MODULES, f"{script} = {target}: no module {module}"
        functions = {node.name for node in ast.parse(MODULES[module].read_text()).body
                     if isinstance(node, ast.FunctionDef)}
        assert function in functions, f"{script} = {target}: {module} defines no {function}"


def test_no_library_module_imports_a_command_module() -> None:
    assert {"deploy.sim.cli", "deploy.experiments.sweep", "deploy.link", "edge_client.cli"} <= COMMANDS
    found = command_imports(MODULES, COMMANDS)
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line} imports the command module {target}"
           for name, line, target in found if (name, target) not in COMMAND_IMPORTS_ALLOWED]
    assert not bad, "\n".join(bad)
    stale = set(COMMAND_IMPORTS_ALLOWED) - {(name, target) for name, _, target in found}
    assert not stale, f"COMMAND_IMPORTS_ALLOWED names imports no module makes any more: {sorted(stale)}"


def test_the_command_check_sees_a_library_importing_a_command(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for path, text in {"__init__.py": "", "__main__.py": "from pkg.cli import main\nmain()\n",
                       "cli.py": "def main():\n    pass\n",
                       "tool.py": "import sys\nif __name__ == '__main__':\n    pass\n",
                       "lib.py": "def f():\n    from pkg import tool\n", "helpers.py": "from pkg.cli import main\n",
                       "other.py": "from pkg import lib\n"}.items():
        (pkg / path).write_text(text)
    modules = project_modules(tmp_path, {"pkg"})
    commands = command_modules(modules, {"pkg-cli": "pkg.cli:main"})
    assert commands == {"pkg.__main__", "pkg.cli", "pkg.tool"}
    assert sorted(command_imports(modules, commands)) == [("pkg.helpers", 1, "pkg.cli"), ("pkg.lib", 2, "pkg.tool")]


# --- the tests: what test modules share lives in conftest.py or a helper module (tests/messages.py,
# tests/ray_cluster.py, tests/tb_events.py, ...), never in another test module: importing a test
# module runs its module-level code again under another name, and binds the two files together.

TESTS = ROOT / "tests"


def imported_test_modules(source: str, test_modules: set[str]) -> list[tuple[int, str]]:
    """(line, test module) of every import of one of `test_modules` (the stems of tests/test_*.py),
    however it is spelt (`import`, `from ... import`, as a package's module, in a function)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [".".join(filter(None, (node.module, alias.name))) for alias in node.names]
        else:
            continue
        found += [(node.lineno, part) for name in names for part in name.split(".") if part in test_modules]
    return sorted(set(found))


def test_no_test_module_imports_another() -> None:
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    assert {"test_layout", "test_ray", "test_tracking"} <= test_modules
    bad = [f"{path.relative_to(ROOT)}:{line} imports the test module {target} (share it through conftest.py or "
           f"a helper module)" for path in sorted(TESTS.glob("*.py"))
           for line, target in imported_test_modules(path.read_text(), test_modules)]
    assert not bad, "\n".join(bad)


def test_the_test_import_check_sees_every_spelling() -> None:
    source = ("from test_ray import edge\nimport test_tracking as tt\nfrom tests import test_sweep\n"
              "from tests.test_cli import x\nimport messages\nfrom ray_cluster import edge\n"
              "def late():\n    from test_ray import ray_local\n    import tests.test_codec\n"
              "from testing import test_nothing\nimport test_layout_helpers\n")
    assert imported_test_modules(source, {"test_ray", "test_tracking", "test_sweep", "test_cli", "test_codec"}) == [
        (1, "test_ray"), (2, "test_tracking"), (3, "test_sweep"), (4, "test_cli"), (8, "test_ray"), (9, "test_codec")]


def conftest_constant(name: str):
    """The literal value conftest.py assigns to `name` (read, not imported: conftest.py is pytest's)."""
    (value,) = [node.value for node in ast.parse((TESTS / "conftest.py").read_text()).body
                if isinstance(node, ast.Assign) and [dotted(t) for t in node.targets] == [name]]
    return ast.literal_eval(value)


def fixture_names(source: str) -> set[str]:
    """The functions `source` decorates with `pytest.fixture` (bare or called)."""
    return {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)
            for decorator in node.decorator_list
            if dotted(decorator.func if isinstance(decorator, ast.Call) else decorator) == "pytest.fixture"}


def test_the_slow_marker_and_the_order_of_the_files_name_what_there_is() -> None:
    """A renamed fixture or test file would leave conftest.py's HEAVY_FIXTURES (the `slow` marker) or
    SLOWEST_FIRST (the order `make test` hands out the files in) silently without effect."""
    fixtures = set().union(*(fixture_names(path.read_text()) for path in TESTS.glob("*.py")))
    assert {"server", "ray_local", "digits_sweep"} <= fixtures
    assert not set(conftest_constant("HEAVY_FIXTURES")) - fixtures
    slowest = conftest_constant("SLOWEST_FIRST")
    assert len(set(slowest)) == len(slowest) and not set(slowest) - {path.name for path in TESTS.glob("test_*.py")}


def test_the_fixture_check_sees_each_kind_of_fixture() -> None:
    source = ("import pytest\n@pytest.fixture\ndef a(): pass\n@pytest.fixture(scope='module')\ndef b(): pass\n"
              "@pytest.mark.slow\ndef test_c(): pass\ndef d(): pass\n")
    assert fixture_names(source) == {"a", "b"}
