"""Sweeps through real processes: outputs, resuming exactly the unchanged points, failures, RGB data;
and the config parsed into settings that name a point and refuse a key they do not know."""

import csv
import functools
import json
import math
import subprocess
import tomllib
from pathlib import Path

import pytest

from deploy.experiments.config import SweepConfig
from deploy.experiments.pareto import pareto_front
from deploy.experiments.plots import markdown_table
from deploy.experiments.results import metric_names
from sweeps import sweep_here

CONFIG = """
[model]
dataset = "digits"
bottleneck = 8
epochs = 1
max_steps = 8

[grid]
codecs = ["fp32"]
seeds = [0]

[defenses]
none = {}
noise = {noise = 0.3}

[attack]
methods = ["inversion"]
epochs = 2
args = ["--aux-limit", "300"]
"""


def _sweep(services, config: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return sweep_here(["--config", str(config), "--out", str(out), *flags], services)


def _stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("points/*/result.json")}


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory, sweep_services):
    """One digits sweep, re-run as a user re-runs one: three points, the first of which fails
    (its data is not there, which only its edge-client process finds out).

    1. plain: it stops at the failure; 2. `--keep-going --log-dir`: the other two run and the
    failure is recorded; 3. again, nothing changed: nothing runs; 4. one defense's noise
    changed: exactly that point runs; 5. a point interrupted after its attack (its result.json
    gone): it ends without attacking again. Each stage's output and the result stamps after it are kept
    for the tests below, so the points train once for all of them. The stages run in this process,
    on the worker's shared server and proxy (tests/sweeps.py)."""
    tmp = tmp_path_factory.mktemp("sweep")
    missing, config, out, logs = tmp / "missing", tmp / "sweep.toml", tmp / "out", tmp / "tb"
    broken = f'broken = {{dataset = "imagefolder", data_root = "{missing}"}}\nnone = {{}}'
    config.write_text(CONFIG.replace("none = {}", broken))
    stages = {"stopped": _sweep(sweep_services, config, out)}
    stamps = {"stopped": _stamps(out)}
    stages["going"] = _sweep(sweep_services, config, out, "--keep-going", "--log-dir", str(logs))
    stamps["going"] = _stamps(out)
    going = json.loads((out / "results.json").read_text())
    stages["again"] = _sweep(sweep_services, config, out, "--keep-going")
    stamps["again"] = _stamps(out)
    config.write_text(CONFIG.replace("none = {}", broken).replace("noise = {noise = 0.3}", "noise = {noise = 0.2}"))
    stages["changed"] = _sweep(sweep_services, config, out, "--keep-going")
    stamps["changed"] = _stamps(out)
    (none,) = [p for p in stamps["changed"] if "__none__" in p.parent.name]
    kept = {"result": json.loads(none.read_text()), "logs": _process_logs(none.parent)}
    none.unlink()
    stages["kept"] = _sweep(sweep_services, config, out, "--keep-going")
    return {"out": out, "config": config, "logs": logs, "missing": missing, "stages": stages, "stamps": stamps,
            "going": going, "kept": kept, "none": none}


def _process_logs(point: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in point.glob("*.log")}


@pytest.mark.slow
def test_a_failing_point_stops_a_sweep_and_is_named(digits_sweep):
    stopped = digits_sweep["stages"]["stopped"]
    assert stopped.returncode == 1
    (bad,) = json.loads((digits_sweep["out"] / "failed.json").read_text())
    assert bad.startswith("default__fp32__broken__s0__") and f"  {bad}: edge-client exited 2: " in stopped.stderr
    assert "3 points, 0 already done" in stopped.stderr
    assert digits_sweep["stamps"]["stopped"] == {}  # it stopped there: the other points never ran


@pytest.mark.slow
def test_with_keep_going_a_failing_point_does_not_stop_the_others(digits_sweep):
    going, out, missing = digits_sweep["stages"]["going"], digits_sweep["out"], digits_sweep["missing"]
    assert going.returncode == 1, going.stderr[-3000:]
    failed = json.loads((out / "failed.json").read_text())  # written again at the end of every run
    (bad,) = failed
    assert bad.startswith("default__fp32__broken__s0__") and str(missing) in failed[bad]["error"]
    assert str(missing) in Path(failed[bad]["log"]).read_text() and f"log: {failed[bad]['log']}" in going.stderr
    assert sorted(p.parent.name.split("__")[2] for p in digits_sweep["stamps"]["going"]) == ["noise", "none"]


@pytest.mark.slow
def test_report_only_reports_the_finished_points_and_runs_nothing(digits_sweep, tmp_path, capsys):
    from deploy.experiments.sweep import main

    out = tmp_path / "out"
    (out / "points").mkdir(parents=True)
    for result in digits_sweep["out"].glob("points/*/result.json"):  # the finished points, nothing else
        (out / "points" / result.parent.name).mkdir()
        (out / "points" / result.parent.name / "result.json").write_bytes(result.read_bytes())
    assert main(["--config", str(digits_sweep["config"]), "--out", str(out), "--report-only"]) == 0
    assert "2 of 3 points finished" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["defense"] for r in results["points"]) == ["noise", "none"]
    assert (out / "report.md").stat().st_size > 0 and not (out / "capture").exists()  # no server, no proxy
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(
        r.parent.name for r in digits_sweep["out"].glob("points/*/result.json"))


@pytest.mark.slow
def test_finished_points_are_reported_with_plots(digits_sweep):
    out = digits_sweep["out"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["defense"] for r in rows} == {"none", "noise"}  # the failed point is in failed.json, not here
    for row in rows:
        for key in ("test_accuracy", "bytes_up_per_sample", "bytes_down_per_sample", "rtt_ms_p50",
                    "samples_per_second", "inversion_mse", "inversion_ssim", "inversion_psnr"):
            assert row[key] != "", key
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 2 and len(results["rows"]) == 2
    for name in ("accuracy_vs_ssim.png", "bytes_vs_ssim.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert "![](accuracy_vs_ssim.png)" in (out / "report.md").read_text()
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary file behind


@pytest.mark.slow
def test_a_rerun_resumes_every_finished_point(digits_sweep):
    again, stamps = digits_sweep["stages"]["again"], digits_sweep["stamps"]
    assert again.returncode == 1, again.stderr[-3000:]  # the broken point fails again
    assert "3 points, 2 already done" in again.stderr
    assert stamps["again"] == stamps["going"]


@pytest.mark.slow
def test_a_changed_setting_reruns_exactly_its_point(digits_sweep):
    changed, stamps, out = digits_sweep["stages"]["changed"], digits_sweep["stamps"], digits_sweep["out"]
    assert changed.returncode == 1, changed.stderr[-3000:]
    assert "3 points, 1 already done" in changed.stderr
    now = stamps["changed"]
    (new,) = set(now) - set(stamps["going"])  # a folder of its own; the other point resumed untouched
    assert {p: now[p] for p in stamps["going"]} == stamps["going"] and "__noise__" in new.parent.name
    by_defense = {r["defense"]: r for r in json.loads((out / "results.json").read_text())["points"]}
    assert by_defense["noise"]["defense_settings"]["noise"] == 0.2 and by_defense["noise"]["key"] == new.parent.name


@pytest.mark.slow
def test_a_point_interrupted_after_its_attack_ends_without_attacking_again(digits_sweep):
    kept, before, none = digits_sweep["stages"]["kept"], digits_sweep["kept"], digits_sweep["none"]
    assert kept.returncode == 1, kept.stderr[-3000:]  # the broken point, as ever
    assert "3 points, 1 already done" in kept.stderr
    assert f"{none.parent.name}: inversion attacked and scored before the sweep was interrupted; kept" in kept.stderr
    assert f"{none.parent.name}: the edge trained to its end before the sweep was interrupted; kept" in kept.stderr
    assert len(before["logs"]) == 3 and _process_logs(none.parent) == before["logs"]  # no edge, no attacker ran
    after = json.loads(none.read_text())
    assert {k: after[k] for k in after if k.startswith("inversion_")} == {
        k: before["result"][k] for k in before["result"] if k.startswith("inversion_")}


def test_an_edge_counts_as_finished_only_by_a_whole_report_of_its_attempts_job(tmp_path):
    from deploy.experiments.runner import edge_finished

    (tmp_path / "attempt.json").write_text('{"job": "p-1a2b3c"}')
    assert not edge_finished(tmp_path)  # no report yet
    stopped = {"job": "p-1a2b3c", "detected": True, "reason": "stopped"}
    for report, finished in (({"job": "p-1a2b3c", "steps": 9}, True), ({"job": "p-999999", "steps": 9}, False),
                             (stopped, True)):  # a point stopped by its detector: its end
        (tmp_path / "edge.json").write_text(json.dumps(report))
        assert edge_finished(tmp_path) is finished, report
    assert not edge_finished(tmp_path, stop_ends=False)  # a base stopped by its detector: not trained whole
    (tmp_path / "edge.json").write_text('{"job": "p-1a2b')  # cut short
    assert not edge_finished(tmp_path)


@pytest.mark.parametrize("text, named", [
    ("[gird]\ncuts = []\n", "unknown sweep config section(s) ['gird']"),
    ("[model]\nepoch = 1\n", "[model]: unknown key 'epoch'; valid keys: "),
    ("[grid]\ncodec = ['int8']\n", "[grid] codec: the codec axis is named codecs"),
    ("[grid]\ncuts = ['block1', 'nope']\n", "edge-client would refuse its settings: unknown cut 'nope' for arch 'cnn'"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, named):
    (tmp_path / "bad.toml").write_text(text)
    done = sweep_here(["--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")])
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.mark.parametrize("config, named", [
    ({"model": {"epoch": 1}}, "[model]: unknown key 'epoch'; valid keys: adv-blocks, adv-every, "),
    ({"defenses": {"cem": {"lamda": 8}}}, "[defenses.cem]: unknown key 'lamda'"),
    ({"grid": {"seed": [0, 1]}}, "[grid] seed: the seed axis is named seeds: seeds = [...]"),
    ({"grid": {"noize": [0.1]}}, "[grid]: unknown axis 'noize'; valid axes: cuts, codecs, seeds, attack.NAME"),
    ({"grid": {"attack": {"widht": [8]}}}, "[grid] attack: unknown key 'widht'; valid keys: aux_data_root"),
    ({"attack": {"method": ["rmle"]}}, "[attack]: unknown key 'method'; valid keys: methods, args, "),
    ({"attack": {"methods": ["rmel"]}}, "unknown method(s) ['rmel']; valid: inversion, rmle, shadow"),
    ({"run": {"worker": 2}}, "[run]: unknown key(s) ['worker']; valid keys: workers, timeout_s"),
    ({"model": {"job": "x"}}, "[model]: 'job' is set by the sweep for every point"),
    ({"model": {"epochs": "many"}}, "[model]: epochs: invalid int value: 'many'"),
    ({"grid": {"noise": 0.1}}, "[grid] noise: an axis is a non-empty list of values"),
    ({"grid": {"noise": [0.1]}, "defenses": {"n": {"noise": 0.2}}}, "[defenses.n] and [grid] both set ['noise']"),
    ({"grid": {"seeds": [0, 0]}}, "come out twice"),
    ({"grid": {"links": ["5g"]}}, "[grid] links: unknown link profile '5g'; valid: none, constrained, lte, wifi"),
    ({"grid": {"links": "wifi"}}, "[grid] links: an axis is a non-empty list of values"),
    ({"run": {"latency_images": 2.5}}, "[run] latency_images: expected an integer, got 2.5"),
    ({"run": {"target_accuracy": 2}}, "[run] target_accuracy: 2.0 must lie in (0, 1]"),
    ({"grid": {"hijack": ["none", "fhsa"]}}, "[grid] hijack: unknown value 'fhsa'; valid: none, fsha"),
    ({"grid": {"hijack": "fsha"}}, "[grid] hijack: an axis is a non-empty list of values"),
    ({"grid": {"hijack": ["fsha"]}, "hijack": {"public_set": "digits"}},
     "[hijack]: unknown key 'public_set'; valid keys: public_data, public_root, public_split"),
    ({"grid": {"hijack": ["fsha"]}, "hijack": {"public_split": "val"}}, "[hijack]: public_split must be train or test"),
    ({"grid": {"hijack": ["fsha"]}, "hijack": {"hijack_record_every": 0}},
     "[hijack]: hijack_record_every must be >= 1"),
    ({"grid": {"hijack": ["fsha"]}, "hijack": {"public_image_size": "16"}},
     "[hijack] public_image_size: expected an integer, got '16'"),
    ({"grid": {"hijack": ["fsha"]}, "hijack": {"public_data": "digitz"}}, "needs public_data: one of ("),
    ({"hijack": {"public_split": "train"}}, "[hijack]: settings of a hijacking server, but no point trains against"),
    ({"grid": {"hijack": ["fsha"]}, "model": {"head_cut": "block2"}},
     "[grid] hijack: the hijacking cloud runs the vanilla split only"),
    ({"grid": {"detect": ["none", "splitgaurd"]}},
     "[grid]: detect: invalid choice 'splitgaurd' (choose from none, splitguard, alignment)"),
])
def test_every_misspelt_or_misplaced_key_is_an_error_naming_it(config, named):
    with pytest.raises(ValueError) as err:
        SweepConfig.from_dict(config).points()
    assert named in str(err.value)


def test_the_documented_config_loads():
    import textwrap

    from deploy.experiments import sweep

    doc = sweep.__doc__
    text = textwrap.dedent(doc[doc.index("    [model]"):doc.index("\nPrecedence")])
    config = SweepConfig.from_dict(tomllib.loads(text))
    assert len(config.points()) == 2 * 2 * 2 * 2 * 2 * 2 * 3  # links, cuts, codecs, noise, aux_limit, seeds; defenses
    assert {p.link for p in config.points()} == {"none", "constrained"} and config.latency_images == 32


@pytest.mark.parametrize("config, named", [
    ({"model": {"arch": "cnn"}, "grid": {"cuts": ["block1", "pool2"]}}, "unknown cut 'pool2' for arch 'cnn'"),
    ({"grid": {"lambda": [0, 8]}, "defenses": {"gmm": {"noise": 0.1, "cem": "gmm"}}},
     "default__fp32__gmm__lambda=0.0__s0__"),
    ({"model": {"lr_schedule": "zigzag"}}, "--lr-schedule kind: 'zigzag'"),
])
def test_a_point_edge_client_would_refuse_is_an_error_before_anything_runs(config, named):
    from deploy.experiments.config import check_points

    with pytest.raises(ValueError, match="edge-client would refuse its settings") as err:
        check_points(SweepConfig.from_dict(config).points())
    assert named in str(err.value)


def test_a_point_is_named_by_its_resolved_settings():
    base = {"model": {"epochs": 2}, "grid": {"codecs": ["fp32", "int8"], "lambda": [8, 16], "seeds": [0, 1],
                                            "attack": {"width": [8]}},
            "defenses": {"gmm": {"noise": 0.1, "cem": "gmm"}}}
    points = SweepConfig.from_dict(base).points()
    assert len(points) == 8 and points[0].key.startswith("default__fp32__gmm__lambda=8.0__attack.width=8__s0__")
    # What runs: the settings that differ from edge-client's defaults (fp32 and seed 0 are its own).
    assert dict(points[0].edge) == {"epochs": 2, "noise": 0.1, "cem": "gmm", "lambda": 8.0}
    assert dict(points[-1].edge) == {"epochs": 2, "noise": 0.1, "cem": "gmm", "lambda": 16.0, "codec": "int8",
                                     "seed": 1}
    keys = [p.key for p in points]

    def keys_after(**change) -> list[str]:
        config = json.loads(json.dumps(base))
        for section, table in change.items():
            config.setdefault(section, {}).update(table)
        return [p.key for p in SweepConfig.from_dict(config).points()]

    # Unchanged settings, however spelt (a value at its default, an int for a float, dashes): the same points.
    assert keys_after(model={"epochs": 2, "noise-kind": "gaussian"}, attack={}) == keys
    assert keys_after(grid={"lambda": [8.0, 16]}) == keys
    # A changed [model] setting, defense value or attack setting: every point it reaches is a new one.
    assert not set(keys_after(model={"epochs": 3})) & set(keys)
    assert not set(keys_after(defenses={"gmm": {"noise": 0.2, "cem": "gmm"}})) & set(keys)
    assert not set(keys_after(attack={"epochs": 1})) & set(keys)
    # A changed axis value: the points with that value are new, the others stay.
    assert set(keys_after(grid={"lambda": [8, 32]})) & set(keys) == {k for k in keys if "lambda=8.0" in k}
    # Seeds of one setting share its group, which the aggregate averages over.
    assert len({p.identity(seed=False) for p in points}) == 4


def test_a_link_names_its_points_and_a_sweep_without_one_keeps_its_names():
    from deploy.experiments.results import aggregate, time_to_accuracy

    plain = SweepConfig.from_dict({"grid": {"codecs": ["fp32", "int8"]}}).points()
    linked = SweepConfig.from_dict({"grid": {"codecs": ["fp32", "int8"], "links": ["none", "wifi"]}}).points()
    assert [p.link for p in linked] == ["none", "none", "wifi", "wifi"]  # links vary slowest
    assert [p.key for p in linked[:2]] == [p.key for p in plain]  # "none" is the sweep without a link
    assert linked[2].key.startswith("default__fp32__none__link=wifi__s0__") and linked[2].key[-8:] != plain[0].key[-8:]
    timed = SweepConfig.from_dict({"run": {"latency_images": 8}}).points()[0]
    assert timed.latency_images == 8 and timed.key != plain[0].key  # latency measured: another point
    row = {"group": "g", "cut": "block1", "bottleneck": 0, "codec": "fp32", "defense": "none", "link": "wifi",
           "epoch_seconds": [2.0, 3.0, 4.0], "epoch_train_accuracy": [0.5, 0.91, 0.95], "time_to_accuracy_s": 5.0}
    assert (time_to_accuracy(row, 0.9), time_to_accuracy(row, 0.95), time_to_accuracy(row, 0.99)) == (5.0, 9.0, None)
    # the rows follow the config's target, whatever target the point's own run had
    (agg,) = aggregate(SweepConfig.from_dict({"run": {"target_accuracy": 0.95}}), [row])
    assert (agg["link"], agg["time_to_accuracy_s"]) == ("wifi", 9.0)


def test_a_hijack_axis_names_only_its_hijacked_points_and_kept_results_keep_their_names():
    """`hijack = "none"` is the sweep without the axis: its points keep their keys, so a study's kept
    results (results/cifar10_converged, of examples/cifar10_converged.toml) stay its points. The
    hijacking server's public data defaults to the test split of the edge's own dataset, root and
    size, and is part of the hijacked points' identity, not of where the data lives."""
    example = tomllib.loads(Path("examples/cifar10_converged.toml").read_text())
    kept = {path.stem for path in Path("results/cifar10_converged").glob("*.json")}
    assert kept and kept <= {p.key for p in SweepConfig.from_dict(example).points()}
    example["grid"]["hijack"] = ["none", "fsha"]
    both = SweepConfig.from_dict(example).points()
    assert kept <= {p.key for p in both}
    assert {p.hijack for p in both if "__hijack=fsha__" in p.key} == {"fsha"} and len(both) == 2 * len(
        SweepConfig.from_dict(tomllib.loads(Path("examples/cifar10_converged.toml").read_text())).points())

    config = {"model": {"dataset": "imagefolder", "data_root": "/data/a", "image_size": 16},
              "grid": {"hijack": ["none", "fsha"], "detect": ["none", "alignment"]}}
    points = SweepConfig.from_dict(config).points()
    assert [p.key.rsplit("__", 2)[0] for p in points] == [
        "default__fp32__none__detect=none", "default__fp32__none__detect=alignment",
        "default__fp32__none__detect=none__hijack=fsha", "default__fp32__none__detect=alignment__hijack=fsha"]
    assert points[0].hijack_settings == () and dict(points[2].hijack_settings) == {
        "public_data": "imagefolder", "public_root": "/data/a", "public_image_size": 16, "public_split": "test",
        "hijack_record_every": 10}
    moved = {**config, "model": {**config["model"], "data_root": "/elsewhere"}}
    assert [p.key for p in SweepConfig.from_dict(moved).points()] == [p.key for p in points]
    other = {**config, "hijack": {"public_split": "train"}}  # the attacker's images: another point
    changed = [p.key for p in SweepConfig.from_dict(other).points()]
    assert changed[:2] == [p.key for p in points[:2]] and not set(changed[2:]) & {p.key for p in points}
    own = {**config, "hijack": {"public_data": "digits"}}  # other data than the edge's: not its root or size
    assert dict(SweepConfig.from_dict(own).points()[2].hijack_settings) == {
        "public_data": "digits", "public_split": "test", "hijack_record_every": 10}


def test_pareto_front_and_grid_expansion():
    # (ssim, accuracy): the third point is dominated by the first
    assert pareto_front([(0.2, 0.9), (0.5, 0.99), (0.3, 0.85), (0.1, 0.5)]) == [3, 0, 1]
    config = SweepConfig.from_dict({"grid": {"cuts": ["conv1", "block1"], "codecs": ["fp32", "int8"],
                                             "seeds": [0, 1], "lr_schedule": ["constant", "paper"]},
                                    "defenses": {"a": {}, "b": {"noise": 0.1}}})
    points = config.points()
    assert len(points) == 32 and len({p.key for p in points}) == 32
    assert {p.setting("lr_schedule") for p in points} == {"constant", "paper"}


def test_table_shows_the_spread_over_seeds_even_when_it_is_zero():
    rows = [{"acc": 0.5, "acc_std": 0.0, "seeds": 2}, {"acc": 0.5, "acc_std": 0.0, "seeds": 1},
            {"acc": 0.25, "acc_std": 0.125, "seeds": 3}, {"acc": None, "seeds": 2}]
    lines = markdown_table(rows, [("acc", "{:.3f}")]).splitlines()
    assert lines[2:] == ["| 0.500 ± 0.000 |", "| 0.500 |", "| 0.250 ± 0.125 |", "| - |"]


def test_flags_mapping():
    from deploy.experiments.config import as_flags

    assert as_flags({"noise": 0.1, "freeze_gates": True, "download": False}) == ["--noise", "0.1", "--freeze-gates"]
    with pytest.raises(ValueError):
        SweepConfig.from_dict({"oops": {}})


def test_attack_table_and_per_cut_bottleneck_parse():
    config = SweepConfig.from_dict({"model": {"dataset": "cifar10", "data_root": "/d"},
                                    "grid": {"cuts": ["conv1", {"cut": "pool2", "bottleneck": 8}]},
                                    "attack": {"methods": ["rmle"], "blocks": 8, "args": ["--aux-limit", "9"]}})
    assert [(p.setting("cut"), p.setting("bottleneck")) for p in config.points()] == [("conv1", 0), ("pool2", 8)]
    assert config.points()[1].key.startswith("pool2-b8__fp32__none__s0__")
    assert config.attacks == ("rmle",) and config.attack_args == ("--aux-limit", "9")
    assert config.attacker_settings() == {"aux_dataset": "cifar10", "aux_data_root": "/d", "blocks": 8}
    assert config.scorer_data() == {"dataset": "cifar10", "data_root": "/d"}
    other = SweepConfig.from_dict({"model": {"dataset": "cifar10", "data_root": "/d"},
                                   "attack": {"aux_dataset": "cifar100", "aux_data_root": "/e"}})
    assert other.attacker_settings() == {"aux_dataset": "cifar100", "aux_data_root": "/e"}
    assert SweepConfig().attacker_settings() == {"aux_dataset": "digits"}
    assert SweepConfig.from_dict({"run": {"timeout_s": 5}}).timeout_s == 5.0 and SweepConfig().timeout_s == 1800
    with pytest.raises(ValueError, match="bloks"):
        SweepConfig.from_dict({"attack": {"bloks": 8}})
    with pytest.raises(ValueError, match="cuts entry"):
        SweepConfig.from_dict({"grid": {"cuts": [{"bottleneck": 8}]}})


def test_data_roots_become_absolute_and_the_cli_one_wins(tmp_path, monkeypatch):
    from deploy.experiments.config import with_absolute_roots

    monkeypatch.chdir(tmp_path)
    config = SweepConfig.from_dict({"model": {"dataset": "imagefolder", "data_root": "data/a"},
                                    "attack": {"aux_data_root": "../b"}})
    resolved = with_absolute_roots(config)
    assert resolved.model["data_root"] == str(tmp_path / "data" / "a")
    assert resolved.attack["aux_data_root"] == str(tmp_path.parent / "b")
    assert with_absolute_roots(config, "elsewhere").model["data_root"] == str(tmp_path / "elsewhere")
    assert config.model["data_root"] == "data/a"  # the loaded config is left as it was


def test_a_points_key_does_not_depend_on_where_the_data_lives(tmp_path, monkeypatch):
    """A study resumes on another machine from its results/ files, found by key: the data's folder
    (the edge's, the attacker's, and the one each extra attacker inherits) is no part of it."""
    from deploy.experiments.config import with_absolute_roots

    monkeypatch.chdir(tmp_path)
    config = SweepConfig.from_dict({"model": {"dataset": "imagefolder", "data_root": "data/a"},
                                    "base": {"epochs": 2}, "attack": {"variants": {"large": {"blocks": 4}}}})
    here, there = (with_absolute_roots(config, root).points()[0] for root in ("data/a", "/mnt/elsewhere"))
    assert dict(dict(here.variants)["large"])["aux_data_root"] != dict(dict(there.variants)["large"])["aux_data_root"]
    assert here.key == there.key and here.base.key == there.base.key
    other = SweepConfig.from_dict({"model": {"dataset": "imagefolder", "data_root": "data/a"}, "base": {"epochs": 2},
                                   "attack": {"variants": {"large": {"blocks": 8}}}})
    assert with_absolute_roots(other).points()[0].key != here.key  # what the variant is still counts


def test_plot_labels_of_close_points_neither_overlap_nor_leave_the_axes():
    """The demo's six points once printed two labels on top of each other; points near the
    right edge ran their labels into the legends outside the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from deploy.experiments.plots import _place_labels

    fig, ax = plt.subplots(figsize=(7, 5))
    close = [(0.950 + 1e-4 * i, 0.980 + 1e-4 * i) for i in range(6)]  # more than the four corners of a point
    points = [*close, (0.965, 0.995), (0.966, 0.989), (0.937, 0.972)]
    ax.plot(*zip(*points), "o")
    notes = _place_labels(ax, [(f"noise+cem / int8 #{i}", x, y) for i, (x, y) in enumerate(points)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [Text.get_window_extent(n, renderer) for n in notes]  # the texts, not their leader lines
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert any(n.arrow_patch is not None for n in notes)  # a label moved off its point has a leader line
    plt.close(fig)


@pytest.mark.slow
def test_sweep_points_are_runs_with_their_settings_and_metrics_as_hparams(digits_sweep):
    """`split-sweep --log-dir` (the keep-going stage): one TensorBoard run per finished point."""
    from tb_events import events, hparams_data, hparams_metadata, scalars, session_hparams

    out, logs = digits_sweep["out"], digits_sweep["logs"]
    rows = digits_sweep["going"]["points"]  # before stage 4 re-ran the noise point without --log-dir
    assert len(rows) == 2
    assert sorted(p.name for p in logs.iterdir()) == sorted(r["key"] for r in rows)
    for row in rows:
        acc = events(logs / row["key"])
        hparams = session_hparams(acc)
        for key in ("cut", "codec", "defense"):
            assert hparams[key] == row[key]
        assert (hparams["bottleneck"], hparams["seed"]) == (row["bottleneck"], row["seed"])
        assert hparams["defense_settings.noise"] == pytest.approx(row["defense_settings"]["noise"])
        # the table's columns: the point's settings and its metrics, not every scalar of the run
        experiment = hparams_data(acc, hparams_metadata.EXPERIMENT_TAG).experiment
        tags = [m.name.tag for m in experiment.metric_infos]
        metrics = metric_names(SweepConfig.from_dict(tomllib.loads(CONFIG)))
        assert sorted(tags) == sorted(f"hparams/{m}" for m in metrics)
        assert tags[:4] == ["hparams/test_accuracy", "hparams/inversion_mse", "hparams/inversion_ssim",
                            "hparams/inversion_psnr"]
        assert {h.name for h in experiment.hparam_infos} == set(hparams)
        for metric in ("test_accuracy", "bytes_up_per_sample", "inversion_ssim", "inversion_mse"):
            assert scalars(acc, f"hparams/{metric}") == pytest.approx({0: row[metric]}, rel=1e-6), metric
        history = row["inversion_attacker"]["inverse_loss_history"]
        assert len(history) == 2  # [attack] epochs = 2
        assert scalars(acc, "attack/inversion_loss") == pytest.approx(dict(enumerate(history, 1)), rel=1e-6)
        edge = json.loads((out / "points" / row["key"] / "edge.json").read_text())
        assert scalars(acc, "train/loss") == pytest.approx({1: edge["history"][0]["train_loss"]}, rel=1e-6)
        assert not any(math.isnan(v) for v in scalars(acc, "train/accuracy").values())


def _point(defense: str, seed: int, accuracy: float, mse: float, **settings) -> dict:
    settings = {"noise": 0.1, **settings, **({"seed": seed} if seed else {})}
    cem = {k: v for k, v in settings.items() if k in ("cem", "lambda")}
    return {"defense": defense, "seed": seed, "group": defense + str(sorted(cem.items())) + str(settings["noise"]),
            "cut": "pool2", "codec": "fp32", "axes": {}, "settings": settings, "attack_settings": {},
            "test_accuracy": accuracy, "inversion_mse": mse, "inversion_ssim": 0.5 - mse}


def test_defense_gains_pair_each_cem_point_with_its_noise_alone_twin_at_the_same_seed():
    from deploy.experiments.demo import verdict
    from deploy.experiments.gains import defense_gains, markdown

    rows = [_point("noise", 0, 0.90, 0.010), _point("noise", 1, 0.80, 0.020),
            _point("gmm", 0, 0.895, 0.013, cem="gmm", **{"lambda": 8}),
            _point("gmm", 1, 0.79, 0.022, cem="gmm", **{"lambda": 8}),
            _point("far", 0, 0.85, 0.030, cem="gmm", **{"lambda": 16}),
            _point("orphan", 0, 0.9, 0.05, cem="gmm", noise=0.3, **{"lambda": 8})]  # no noise-0.3 twin ran
    gmm, far = defense_gains(rows, ("inversion",))
    assert (gmm["defense"], gmm["baseline"], gmm["seeds"]) == ("gmm", "noise", [0, 1])
    # Paired per seed (+30% and +10%), not the ratio of means (+16.7%): the seeds' MSEs differ twofold.
    assert gmm["inversion_mse_gain_pct_each"] == pytest.approx([30.0, 10.0])
    assert gmm["inversion_mse_gain_pct"] == pytest.approx(20.0)
    assert gmm["accuracy_delta_points_each"] == pytest.approx([-0.5, -1.0]) and gmm["matched"]
    assert gmm["inversion_ssim_delta"] == pytest.approx(-0.0025)
    assert far["inversion_mse_gain_pct"] == pytest.approx(200.0) and not far["matched"]
    table = markdown([gmm, far], ("inversion",))
    assert "| gmm | noise | 0, 1 | -0.8 (-0.5, -1.0) | +20% (+30%, +10%) | -0.003 |" in table
    assert "-5.0 (not matched)" in table
    assert defense_gains(rows[:2], ("inversion",)) == [] and markdown([], ("inversion",)) == ""
    for g in (gmm, far):
        g["codec"] = "int8" if g is far else "fp32"
    story = verdict([gmm, far]).splitlines()
    assert story[0].startswith("- fp32: gmm changes attack MSE by +20.0%") and \
        story[0].endswith("gmm helps at matched accuracy.")
    assert story[1].endswith("accuracy is not matched (more than 1 point apart), so no verdict.")


def test_a_hijacked_point_is_paired_with_its_hijacked_twin_and_a_stopped_one_with_none():
    from deploy.experiments.gains import defense_gains

    honest, hijacked = _point("noise", 0, 0.90, 0.010), {**_point("noise", 0, 0.85, 0.020), "hijack": "fsha"}
    cem = {**_point("gmm", 0, 0.86, 0.030, cem="gmm", **{"lambda": 8}), "hijack": "fsha"}
    (gain,) = defense_gains([hijacked, honest, cem], ("inversion",))  # the honest twin last: not taken
    assert gain["accuracy_delta_points"] == pytest.approx(1.0) and gain["inversion_mse_gain_pct"] == pytest.approx(50)
    stopped = {**cem, "test_accuracy": None, "inversion_mse": None, "detected": True}
    assert defense_gains([honest, hijacked, stopped], ("inversion",)) == []


def test_the_report_shows_the_hijacker_and_the_detector_averaged_over_seeds(tmp_path):
    """results.csv's and report.md's row of a hijacked, detecting setting: `detected` the share of its
    seeds stopped, `hijack_ssim` the mean; a setting whose every seed was stopped has no accuracy."""
    from deploy.experiments.plots import write_report
    from deploy.experiments.results import aggregate

    config = SweepConfig.from_dict({"grid": {"hijack": ["fsha"], "detect": ["alignment"], "seeds": [0, 1]},
                                    "attack": {"methods": []}})
    rows = [{"group": "g", "cut": "block1", "bottleneck": 8, "codec": "fp32", "defense": "none", "seed": seed,
             "hijack": "fsha", "axes": {"detect": "alignment"}, "test_accuracy": accuracy, "detected": stopped,
             "detected_at_step": 10 if stopped else None, "hijack_ssim": ssim, "hijack_ssim_max": ssim,
             "hijack_ssim_at_detection": ssim if stopped else None}
            for seed, accuracy, stopped, ssim in ((0, None, True, 0.3), (1, 0.9, False, 0.8))]
    (row,) = aggregate(config, rows)
    assert (row["hijack"], row["detected"], row["detected_at_step"], row["hijack_ssim"]) == ("fsha", 0.5, 10, 0.55)
    assert row["test_accuracy"] == 0.9 and row["hijack_ssim_at_detection"] == 0.3
    (none,) = aggregate(config, [{**r, "test_accuracy": None} for r in rows])
    assert "test_accuracy" not in none
    write_report(config, [row], tmp_path)
    table = (tmp_path / "report.md").read_text()
    assert "| hijack | hijack_ssim | hijack_ssim_max | hijack_ssim_at_detection | detected | detected_at_step |" in table
    assert "| fsha | 0.550 ± 0.354 | 0.550 ± 0.354 | 0.300 ± 0.000 | 0.50 ± 0.71 | 10 ± 0 |" in table


def test_cem_is_also_compared_with_noise_alone_at_its_own_accuracy():
    """Where CEM costs accuracy at the same noise, the fair baseline is more noise: the noise-alone
    curve (one seed, several noise levels) read at the CEM point's accuracy."""
    from deploy.experiments.gains import defense_gains, markdown, noise_curve_mse

    curve = [(0.90, 0.010), (0.80, 0.030)]
    assert noise_curve_mse(0.85, curve) == pytest.approx(0.020)  # linear between the bracketing levels
    assert noise_curve_mse(0.905, curve) == 0.010 and noise_curve_mse(0.795, curve) == 0.030  # within a point
    assert noise_curve_mse(0.92, curve) is None and noise_curve_mse(0.5, curve) is None  # noise never got there
    rows = [_point("noise", 0, 0.90, 0.010), _point("noise", 0, 0.80, 0.030, noise=0.3),
            _point("gmm", 0, 0.85, 0.025, cem="gmm", **{"lambda": 8}),  # -5 points at the same noise ...
            _point("gmm", 1, 0.85, 0.025, cem="gmm", **{"lambda": 8}), _point("noise", 1, 0.88, 0.010)]
    (gmm,) = defense_gains(rows, ("inversion",))
    assert gmm["inversion_mse_gain_pct_each"] == pytest.approx([150.0, 150.0]) and not gmm["matched"]
    # ... but +25% over noise alone at 0.85 (seed 0); seed 1 has one noise level only, so no curve
    assert gmm["inversion_mse_gain_at_accuracy_pct_each"] == pytest.approx([25.0])
    assert "| +25% |" in markdown([gmm], ("inversion",))


def test_attacker_aware_and_pruned_points_are_paired_with_noise_alone_like_cem():
    from deploy.experiments.gains import defense_gains

    rows = [_point("noise", 0, 0.90, 0.010), _point("noise", 0, 0.80, 0.030, noise=0.3),
            _point("adv4", 0, 0.89, 0.016, adv_weight=4, adv_blocks=2),
            _point("prune", 0, 0.88, 0.011, prune_ratio=0.5, prune_freeze=1)]  # any pruning setting
    rows[2]["group"], rows[3]["group"] = "adv4", "prune"
    adv, prune = defense_gains(rows, ("inversion",))
    assert (adv["defense"], adv["baseline"]) == ("adv4", "noise") and adv["matched"]
    assert adv["inversion_mse_gain_pct"] == pytest.approx(60.0)
    assert adv["inversion_mse_gain_at_accuracy_pct"] == pytest.approx(0.016 / 0.012 * 100 - 100)
    assert prune["inversion_mse_gain_at_accuracy_pct"] == pytest.approx(0.011 / 0.014 * 100 - 100)  # below the curve
    assert not prune["matched"]  # -2 points


@pytest.mark.slow
def test_runs_in_parallel_as_ray_tasks_each_success_handed_on_as_it_ends(monkeypatch, without_ray):
    """workers > 1: each run is a Ray task (its work travels by reference to deploy.experiments.runner);
    a success goes to `done` at once (a study keeps the point's result then), a failure is recorded.
    _run_all starts and shuts down a Ray of its own, as a sweep does: the worker's cluster is
    stopped for it (conftest.py's `without_ray`)."""
    from deploy.experiments.runner import _run_all
    from deploy.sim.config import ray_environment

    for key, value in ray_environment(local=True).items():
        monkeypatch.setenv(key, value)  # _run_all sets them for its cluster: restored after the test
    work = {"a": functools.partial(dict, rows=1), "b": functools.partial(dict, error="boom", log="b.log")}
    kept: list[str] = []
    failures = _run_all(SweepConfig(workers=2), work, False, True, "test", kept.append)
    assert kept == ["a"] and failures == {"b": {"error": "boom", "log": "b.log"}}
