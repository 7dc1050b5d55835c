"""A two-phase sweep on digits through real processes: a base trained once per seed, points that
continue it, scores on a class-stratified sample, a second attacker, results kept in a folder
that alone rebuilds the tables (a file of its own: the suite's workers share the slow sweeps)."""

import json
import subprocess
import sys

import pytest

from deploy.experiments.config import SweepConfig
from deploy.experiments.runner import other_bases
from sweeps import sweep_here

CONFIG = """
[model]
bottleneck = 4
epochs = 1
batch_size = 32
lr = 0.01
lr_schedule = "constant"

[base]
epochs = 2
lr = 0.05
lr_schedule = "cosine"
noise = 0.1

[grid]
seeds = [0]

[defenses]
"noise0.1" = {noise = 0.1}
"gmm@0.1" = {noise = 0.1, cem = "gmm", lambda = 4, cem_warmup = 0}

[attack]
epochs = 1
width = 8
blocks = 1
aux_limit = 400
per_class = 5
variants = {wide = {width = 16, blocks = 2}}
"""


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.experiments.sweep", *args], capture_output=True, text=True, timeout=900)


def test_points_share_their_base_and_name_it():
    config = SweepConfig.from_dict(__import__("tomllib").loads(CONFIG))
    points = config.points()
    assert len({p.base for p in points}) == 1
    base = dict(points[0].base.edge)
    # [base] over [model], none of the points' defenses
    assert base == {"bottleneck": 4, "epochs": 2, "batch_size": 32, "noise": 0.1}  # lr, schedule, seed: defaults
    assert config.scored == ("inversion", "inversion_wide")
    other = SweepConfig.from_dict(__import__("tomllib").loads(CONFIG.replace("epochs = 2", "epochs = 3")))
    assert {p.key for p in points}.isdisjoint(p.key for p in other.points())  # another base: other points


def test_the_seeds_of_a_two_phase_point_form_one_group_and_kept_rows_join_it(tmp_path):
    """Each seed continues a base of its own; the table and the gains average a setting over its
    seeds, so its group must not depend on the base's seed (it did: every seed was a setting alone)."""
    from deploy.experiments.results import finished_rows

    config = SweepConfig.from_dict(__import__("tomllib").loads(CONFIG.replace("seeds = [0]", "seeds = [0, 1]")))
    points = config.points()
    assert len({p.base.key for p in points}) == 2 and len({p.key for p in points}) == 4
    assert len({p.identity(seed=False) for p in points}) == 2  # one group per defense, both seeds in it
    assert {p.defense for p in points if p.identity(seed=False) == points[0].identity(seed=False)} == {"noise0.1"}
    # A row kept with the old group (its base's seed in it) joins the config's group when read back.
    (tmp_path / f"{points[0].key}.json").write_text(json.dumps({"key": points[0].key, "group": "stale"}))
    (row,) = finished_rows(points, tmp_path / "out", tmp_path)
    assert row["group"] == points[0].identity(seed=False)


@pytest.mark.slow
def test_a_two_phase_sweep_continues_its_base_and_keeps_its_results(tmp_path):
    (tmp_path / "sweep.toml").write_text(CONFIG)
    out, results = tmp_path / "out", tmp_path / "results"
    done = sweep("--config", str(tmp_path / "sweep.toml"), "--out", str(out), "--results", str(results))
    assert done.returncode == 0, done.stderr[-3000:]
    (base_dir,) = (out / "bases").iterdir()
    base = json.loads((base_dir / "base.json").read_text())
    assert len(base["history"]) == 2 and (out / "jobs" / base["checkpoint"]).exists()
    rows = json.loads((out / "results.json").read_text())["points"]
    assert len(rows) == 2
    for row in rows:
        edge = json.loads((out / "points" / row["key"] / "edge.json").read_text())
        assert edge["init_job"] == base["job"] and edge["init_from"] == base["encoder"]
        assert row["base"]["key"] == base["key"] and len(row["history"]) == 1
        assert row["scored_sample"]["per_class_images"] == [5] * 10
        for name in ("inversion", "inversion_wide"):
            assert 0 < row[f"{name}_mse"] < 1 and row[f"{name}_attacker"]["inverse_loss_history"]
        assert row["inversion_wide_attacker"]["inverse_width"] == 16 and row["inversion_attacker"]["inverse_width"] == 8
    kept = sorted(p.name for p in results.iterdir())
    assert kept == sorted(f"{row['key']}.json" for row in rows)
    table = json.loads((out / "results.json").read_text())
    gains = table["defense_gains"]
    assert len(gains) == 1 and {"inversion_mse_gain_pct", "inversion_wide_mse_gain_pct"} <= set(gains[0])

    # Resumed from the kept results alone (another machine: no out/ folder): nothing runs, the same tables.
    # Nothing to run: in this process (tests/sweeps.py), without the start-up of one of its own.
    again = tmp_path / "elsewhere"
    done = sweep_here(["--config", str(tmp_path / "sweep.toml"), "--out", str(again), "--results", str(results),
                       "--report-only"])
    assert done.returncode == 0, done.stderr[-3000:]
    rebuilt = json.loads((again / "results.json").read_text())
    assert rebuilt["rows"] == table["rows"] and rebuilt["defense_gains"] == gains
    done = sweep_here(["--config", str(tmp_path / "sweep.toml"), "--out", str(again), "--results", str(results)])
    assert done.returncode == 0 and "2 points, 2 already done" in done.stderr, done.stderr[-3000:]
    assert not (again / "bases").exists()

    # Continued elsewhere without the base's files: its base is trained again there, which is another base
    # (here: a kept row says it continued an encoder of another digest), so the point left is refused.
    assert all(row["base"]["encoder_sha256"] == base["encoder_sha256"] for row in rows)
    other = tmp_path / "other-results"
    other.mkdir()
    first, second = (json.loads((results / f"{row['key']}.json").read_text()) for row in rows)
    first["base"]["encoder_sha256"] = "0" * 64
    (other / f"{first['key']}.json").write_text(json.dumps(first))
    done = sweep_here(["--config", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "third"),
                       "--results", str(other)])
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"{second['key']}: its base {base['key']} was trained here" in done.stderr
    assert "continue another training of it" in done.stderr and "another --results folder" in done.stderr
    assert not (tmp_path / "third" / "points" / second["key"]).exists()


def test_points_of_another_training_of_a_base_are_told_by_digest_or_else_by_accuracy():
    record = {"key": "b", "test_accuracy": 0.8131, "encoder_sha256": "new"}
    rows = [{"key": "old", "base": {"key": "b", "test_accuracy": 0.8136}},  # kept before digests were
            {"key": "same", "base": {"key": "b", "test_accuracy": 0.8131, "encoder_sha256": "new"}},
            {"key": "twin", "base": {"key": "b", "test_accuracy": 0.8131, "encoder_sha256": "other"}},
            {"key": "elsewhere", "base": {"key": "c", "test_accuracy": 0.5}}, {"key": "one-phase"}]
    assert set(other_bases(rows, {"b": record})) == {"b"}
    assert "2 finished point(s) (old, ...)" in other_bases(rows, {"b": record})["b"]
    assert "0.8131" in other_bases(rows, {"b": record})["b"] and "0.8136" in other_bases(rows, {"b": record})["b"]
    assert other_bases(rows[1:2] + rows[3:], {"b": record}) == {}
    assert other_bases([{"key": "old", "base": {"key": "b", "test_accuracy": 0.8131}}], {"b": record}) == {}
