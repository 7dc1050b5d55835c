"""Whole sweeps and the demo on data other than the digits sweep of tests/test_sweep.py: an RGB
ImageFolder tree through a link, and the demo's attacker flags; each runs real processes on
127.0.0.1, in this process against the worker's shared server and proxy (tests/sweeps.py) (a file
of its own so that the suite's workers share the slow sweeps)."""

import csv
import json
from dataclasses import replace

import pytest

from sweeps import sweep_here


def _rgb_imagefolder(root, per_class: int = 12, side: int = 16) -> None:
    """A tiny RGB ImageFolder tree: per split and class, smooth colour patterns with some noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, side)
    for split in ("train", "test"):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = np.stack([np.outer(ramp, ramp), np.add.outer(ramp, ramp) / 2, np.outer(1 - ramp, ramp)], -1)
                base[..., c] += 0.5  # the class is a colour cast
                image = np.clip(base * rng.uniform(0.5, 1.0) + rng.normal(0, 0.1, base.shape), 0, 1)
                Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_sweep_attacks_and_scores_an_rgb_imagefolder_with_its_own_data(tmp_path, sweep_services):
    """The attacker learns from, and the scorer rebuilds, the edge's dataset (here 3 channels), not
    digits; the [attack] table's and the attack axis's settings reach the attacker and its record;
    the grid's values name the point. The point trains, and its latency is measured, through a
    `split-link` of the constrained profile (40 ms each way, +-5 ms): no round trip is shorter
    than the link's, and the attacks still see the features the proxy behind the link recorded."""
    import numpy as np

    data = tmp_path / "images"
    _rgb_imagefolder(data)
    (tmp_path / "sweep.toml").write_text(f"""
[model]
dataset = "imagefolder"
data_root = "{data}"
image_size = 16
bottleneck = 8
epochs = 1
batch_size = 8

[grid]
cuts = [{{cut = "block1", bottleneck = 4}}]  # the point's own bottleneck wins over [model]'s
noise = [0.1]
attack.width = [8]
links = ["constrained"]

[defenses]
none = {{}}

[attack]
methods = ["inversion", "rmle"]
epochs = 1
blocks = 1
rmle_iterations = 3
rmle_tv_weight = 0.1

[run]
latency_images = 3
target_accuracy = 0.05
""")
    out = tmp_path / "out"
    done = sweep_here(["--config", str(tmp_path / "sweep.toml"), "--out", str(out)], sweep_services)
    assert done.returncode == 0, done.stderr[-3000:]
    (point,) = json.loads((out / "results.json").read_text())["points"]
    assert point["key"].startswith("block1-b4__fp32__none__noise=0.1__attack.width=8__link=constrained__s0__")
    assert point["bottleneck"] == 4 and point["defense_settings"]["noise"] == 0.1
    assert point["settings"] == {"dataset": "imagefolder", "data_root": str(data), "image_size": 16, "bottleneck": 4,
                                 "epochs": 1, "batch_size": 8, "cut": "block1", "noise": 0.1}
    inversion, rmle = point["inversion_attacker"], point["rmle_attacker"]
    assert inversion["aux_dataset"] == rmle["aux_dataset"] == "imagefolder"
    assert inversion["aux_data_root"] == str(data) and inversion["aux_images"] == 36
    assert (inversion["inverse_blocks"], inversion["inverse_width"], inversion["inverse_epochs"]) == (1, 8, 1)
    assert len(inversion["inverse_loss_history"]) == 1
    assert (rmle["rmle_iterations"], rmle["rmle_tv_weight"]) == (3, 0.1)
    folder = out / "points" / point["key"]
    for method in ("inversion", "rmle"):
        # The scorer compares shapes: scores exist only if it rebuilt the same 3-channel images.
        recon = np.concatenate([np.load(f) for f in sorted((folder / f"recon-{method}" / "recon").glob("*.npy"))])
        assert recon.shape == (36, 3, 16, 16)
        scores = json.loads((folder / f"attack-{method}" / "attack.json").read_text())
        assert scores["n_images"] == 36 and 0 < scores["ssim"] <= 1
    (row,) = list(csv.DictReader(open(out / "results.csv")))
    assert (row["noise"], row["axes"], row["link"]) == ("0.1", "noise=0.1 attack.width=8", "constrained")
    # Every training step and every timed request crossed the link: 2 x (40 - 5) ms at the least.
    assert point["link"] == "constrained" and point["rtt_ms_p50"] >= 70 and point["latency_ms_p50"] >= 70
    latency = json.loads((folder / "latency.json").read_text())
    # the timed requests were a session of their own, which the attacks (36 images scored above) left out
    assert latency["requests"] == 3 and latency["session_id"] != json.loads((folder / "edge.json").read_text())["session_id"]
    assert point["seconds_per_epoch"] > 0 and point["time_to_accuracy_s"] == point["epoch_seconds"][0]
    assert float(row["seconds_per_epoch"]) == point["seconds_per_epoch"]
    assert (out / "time_vs_ssim.png").stat().st_size > 0 and "## Time vs leakage" in (out / "report.md").read_text()


@pytest.mark.slow
def test_demo_attacker_flags_reach_the_attacker_and_the_report(tmp_path, monkeypatch, sweep_services):
    from deploy.experiments import demo, runner

    tiny = replace(demo.DEMO, model={"dataset": "digits", "bottleneck": 8, "epochs": 1, "max_steps": 4},
                   codecs=("fp32",), defenses={"none": {}}, attack_args=("--aux-limit", "200"))
    monkeypatch.setattr(demo, "DEMO", tiny)
    monkeypatch.setattr(runner, "Services", lambda out, jobs: sweep_services)  # the worker's (tests/sweeps.py)
    assert demo.main(["--out", str(tmp_path), "--workers", "1", "--inverse-epochs", "1", "--inverse-width", "8",
                      "--inverse-blocks", "1"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["attacker"] == {"blocks": 1, "width": 8, "epochs": 1}
    assert "1 residual blocks, width 8, 1 epochs" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_a_hijacking_server_is_an_axis_and_the_edge_that_detects_it_a_finished_point(tmp_path, sweep_services):
    """hijack x detect, 12 steps of digits each: the honest points train against the sweep's server;
    the hijacked ones each against a `cloud-server --hijack fsha` of their own, whose reconstructions
    of the private batches are scored into the row. The edge with the alignment detector stops the
    hijacker at its first check (step 10, exit 3: a finished point, not a failure) and raises no
    false alarm against the honest server; a re-run runs nothing, the stopped point included."""
    (tmp_path / "sweep.toml").write_text("""
[model]
epochs = 1
max_steps = 12

[grid]
hijack = ["none", "fsha"]
detect = ["none", "alignment"]

[hijack]
hijack_record_every = 2

[attack]
methods = []
""")
    out = tmp_path / "out"
    argv = ["--config", str(tmp_path / "sweep.toml"), "--out", str(out)]
    done = sweep_here(argv, sweep_services)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {(p["hijack"], p["axes"]["detect"]): p for p in results["points"]}
    assert len(rows) == 4 and all(("__hijack=fsha__" in p["key"]) == (p["hijack"] == "fsha") for p in rows.values())
    for detect in ("none", "alignment"):
        honest = rows["none", detect]
        assert not honest["detected"] and honest["detected_at_step"] is None and honest["test_accuracy"] > 0.2
        assert "hijack_ssim" not in honest and "attacks_skipped" not in honest
    plain, stopped = rows["fsha", "none"], rows["fsha", "alignment"]
    assert not plain["detected"] and plain["hijack_step"] == 12 and plain["hijack_ssim_at_detection"] is None
    assert 0 < plain["hijack_ssim"] <= plain["hijack_ssim_max"] <= 1 and plain["hijack_mse"] > 0
    assert plain["test_accuracy"] is not None and "hijacking server" in plain["attacks_skipped"]
    assert plain["hijack_settings"] == {"public_data": "digits", "public_split": "test", "hijack_record_every": 2}
    assert [s for s, _ in plain["hijack_ssim_by_step"]] == [1, 2, 4, 6, 8, 10, 12]
    assert (out / plain["hijack_grid"]).stat().st_size > 0
    # the detector's stop: at its first check, the session closed, no evaluation through the hijacker
    assert stopped["detected"] and stopped["detected_at_step"] == 10 and stopped["test_accuracy"] is None
    assert "hijacking suspected at step 10" in stopped["detect_reason"]
    assert stopped["hijack_step"] == 10 and stopped["hijack_ssim_at_detection"] == stopped["hijack_ssim"]
    # one process per point: the reconstructions are of its own session only
    folder = out / "points" / stopped["key"]
    jobs = {json.loads(line)["job"] for line in (folder / "hijack" / "fsha.jsonl").read_text().splitlines()}
    assert jobs == {json.loads((folder / "edge.json").read_text())["job"]}
    table = {(r["hijack"], r["detect"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert (table["fsha", "alignment"]["detected"], table["none", "alignment"]["detected"]) == ("1.0", "0.0")
    assert float(table["fsha", "none"]["hijack_ssim"]) == plain["hijack_ssim"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("points/*/result.json")}
    again = sweep_here(argv, sweep_services)
    assert again.returncode == 0 and "4 already done" in again.stderr, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/result.json")} == stamps
