"""What an install pulls in: ranges in pyproject.toml, exact versions in constraints.txt.

A library that pins exactly replaces its user's own torch or Ray, and one that puts the
attacker's or the simulator's packages into every install burdens an edge device with
them; a constraints file that is not exact, or that falls outside the ranges, makes
`make setup` unreproducible or impossible. These checks read the files (and the sources'
module-level imports), so they fail when such a change is written.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from splitnet.cli_util import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME = canonicalize_name(PROJECT["name"])
EXTRAS: dict[str, list[Requirement]] = {k: [Requirement(r) for r in v]
                                        for k, v in PROJECT["optional-dependencies"].items()}
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
# What an edge device runs (edge-client): nothing else belongs in a plain install.
EDGE = {"torch", "grpcio", "protobuf", "numpy", "tqdm"}


def constraints() -> dict[str, Requirement]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def closure(extras: set[str]) -> list[Requirement]:
    """Core plus the named extras, with the project's references to its own extras followed."""
    out, todo, seen = list(CORE), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in EXTRAS[extra]:
            if canonicalize_name(req.name) == NAME:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def test_dependencies_are_ranges_and_python_3_12_is_allowed():
    declared = CORE + [r for reqs in EXTRAS.values() for r in reqs]
    pinned = [str(r) for r in declared if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins belong in constraints.txt: {pinned}"
    python = Requirement(f"python{PROJECT['requires-python']}").specifier
    assert python.contains("3.11.0") and python.contains("3.12.0") and python.contains("3.13.0")
    assert not python.contains("3.10.12")


def test_a_plain_install_is_what_an_edge_needs():
    assert names(CORE) == EDGE
    for heavy in ("ray", "matplotlib", "scikit-image", "torchmetrics", "torchvision", "scikit-learn"):
        assert heavy not in names(CORE)
    # scikit-image is the tests' SSIM reference only; no role installs it
    assert [extra for extra in EXTRAS if "scikit-image" in names(closure({extra}))] == ["test"]
    assert "ray" not in names(closure({"attack", "plot", "cloud", "data"}))


def test_extras_reference_only_defined_extras_and_all_holds_every_role():
    for extra, reqs in EXTRAS.items():
        for req in reqs:
            if canonicalize_name(req.name) == NAME:
                assert req.extras <= EXTRAS.keys(), f"[{extra}] names an undefined extra: {req}"
    roles = set(EXTRAS) - {"all", "test"}
    assert names(closure({"all"})) == names(closure(roles))


def test_constraints_pin_every_declared_dependency_within_its_range():
    pins = constraints()
    for name, req in pins.items():
        (spec,) = req.specifier  # exactly one specifier, and it is exact
        assert spec.operator == "==" and "*" not in spec.version, f"constraints.txt: {req} is not exact"
    for req in closure(set(EXTRAS)):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {name}"
        version = next(iter(pins[name].specifier)).version
        assert req.specifier.contains(version, prereleases=True), f"constraints.txt: {name}=={version} " \
                                                                   f"outside pyproject's {req}"


def test_torch_and_torchvision_are_a_matching_pair():
    """torchvision 0.(N+15) is built for torch 2.N (0.28 for 2.13): any other pair fails to
    import, or the resolver replaces the torch the first step of `make setup` installed."""
    pins = constraints()
    torch, vision = (Version(next(iter(pins[n].specifier)).version) for n in ("torch", "torchvision"))
    assert not torch.local and not vision.local, "no +cpu / +cuXXX: the same pins serve every TORCH_INDEX"
    assert (torch.major, vision.major) == (2, 0) and vision.minor == torch.minor + 15, (torch, vision)


def test_make_setup_installs_everything_with_the_constraints_from_the_torch_index():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH_INDEX \?= https://download\.pytorch\.org/whl/cpu$", makefile, re.M)
    assert re.search(r"^EXTRAS \?= all,test$", makefile, re.M)
    installs = [line for line in makefile.splitlines() if line.startswith("\t") and " install " in line]  # recipes
    assert len(installs) == 2 and all("-c constraints.txt" in line for line in installs)
    assert "--index-url $(TORCH_INDEX)" in installs[0] and "torch torchvision" in installs[0]
    assert "TORCH_INDEX" in (ROOT / "README.md").read_text()


def module_imports(path: Path) -> set[str]:
    """Top-level packages a module imports when it is loaded (imports inside functions are lazy:
    they load only on the path that needs them, which names its extra)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


# Which install each package's modules must load under.
ROLES = {"splitnet": set(), "cem": set(), "edge_client": set(), "cloud_server": {"cloud"},
         "attacks": {"attack"}, "deploy": {"all"}}


@pytest.mark.parametrize("package", sorted(ROLES))
def test_each_role_loads_with_its_own_install(package):
    distributions = importlib.metadata.packages_distributions()
    allowed = names(closure(ROLES[package]))
    missing = {}
    for path in (ROOT / package).rglob("*.py"):
        for top in module_imports(path) - set(sys.stdlib_module_names) - set(ROLES):
            dists = {canonicalize_name(d) for d in distributions.get(top, [top])}
            if not dists & allowed:
                missing[f"{path.relative_to(ROOT)}: {top}"] = dists
    assert not missing, f"imported at load time, but not in the install of {package}: {missing}"



def test_every_module_an_extra_brings_is_named_after_that_extra():
    distributions = importlib.metadata.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        dists = {canonicalize_name(d) for d in distributions[module]}
        assert dists & names(closure({extra})) and not dists & names(CORE), (module, extra, dists)


@pytest.mark.parametrize("main,argv,module,extra", [
    ("cloud_server.cli", ["--port", "0"], "grpc_health", "cloud"),
    ("edge_client.cli", ["--server", "127.0.0.1:9", "--epochs", "1"], "sklearn", "data"),
])
def test_a_command_missing_its_extra_names_it(monkeypatch, capsys, main, argv, module, extra):
    """On a plain install (an edge device's), `cloud-server` lacks the health service and
    `edge-client`'s bundled digits lack scikit-learn: each says which extra to add."""
    for name in [m for m in sys.modules if m.split(".")[0] == module] or [module]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` then fails as where the package is absent
    monkeypatch.delitem(sys.modules, "cloud_server.server", raising=False)  # imported afresh: it meets the gap
    assert importlib.import_module(main).main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {module} is not installed; it comes with the {extra!r} extra" in err
    assert f"pip install '{PROJECT['name']}[{extra}]'" in err and "Traceback" not in err
