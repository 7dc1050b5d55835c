"""A two-point sweep through real processes, its outputs, and resuming it."""

import csv
import json
import subprocess
import sys

from dataclasses import replace

import pytest

from deploy.plots import markdown_table, pareto_front
from deploy.sweep import SweepConfig

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


def test_two_point_sweep_writes_results_and_resumes(tmp_path):
    (tmp_path / "sweep.toml").write_text(CONFIG)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deploy.sweep", "--config", str(tmp_path / "sweep.toml"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["defense"] for r in rows} == {"none", "noise"}
    for row in rows:
        for key in ("test_accuracy", "bytes_up_per_sample", "bytes_down_per_sample", "rtt_ms_p50",
                    "samples_per_second", "inversion_mse", "inversion_ssim", "inversion_psnr"):
            assert row[key] != "", key
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 2 and len(results["rows"]) == 2
    for name in ("accuracy_vs_ssim.png", "bytes_vs_ssim.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert "![](accuracy_vs_ssim.png)" in (out / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("points/*/result.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 already done" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/result.json")} == stamps


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "bad.toml").write_text("[gird]\ncuts = []\n")
    done = subprocess.run([sys.executable, "-m", "deploy.sweep", "--config", str(tmp_path / "bad.toml"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "gird" in done.stderr


def test_pareto_front_and_grid_expansion():
    # (ssim, accuracy): the third point is dominated by the first
    assert pareto_front([(0.2, 0.9), (0.5, 0.99), (0.3, 0.85), (0.1, 0.5)]) == [3, 0, 1]
    config = SweepConfig.from_dict({"grid": {"cuts": ["conv1", "block1"], "codecs": ["fp32", "int8"],
                                             "seeds": [0, 1]}, "defenses": {"a": {}, "b": {"noise": 0.1}}})
    points = config.points()
    assert len(points) == 16 and len({p.key for p in points}) == 16


def test_table_shows_the_spread_over_seeds_even_when_it_is_zero():
    rows = [{"acc": 0.5, "acc_std": 0.0, "seeds": 2}, {"acc": 0.5, "acc_std": 0.0, "seeds": 1},
            {"acc": 0.25, "acc_std": 0.125, "seeds": 3}, {"acc": None, "seeds": 2}]
    lines = markdown_table(rows, [("acc", "{:.3f}")]).splitlines()
    assert lines[2:] == ["| 0.500 ± 0.000 |", "| 0.500 |", "| 0.250 ± 0.125 |", "| - |"]


def test_flags_mapping():
    from deploy.sweep import _flags

    assert _flags({"noise": 0.1, "freeze_gates": True, "download": False}) == ["--noise", "0.1", "--freeze-gates"]
    with pytest.raises(ValueError):
        SweepConfig.from_dict({"oops": {}})


def _rgb_imagefolder(root, per_class: int = 20, side: int = 16) -> None:
    """A tiny RGB ImageFolder tree: per split and class, smooth colour patterns with some noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, side)
    for split in ("train", "test"):
        for c, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = np.stack([np.outer(ramp, ramp), np.add.outer(ramp, ramp) / 2, np.outer(1 - ramp, ramp)], -1)
                base[..., 2 * c] += 0.5  # the class is a colour cast
                image = np.clip(base * rng.uniform(0.5, 1.0) + rng.normal(0, 0.1, base.shape), 0, 1)
                Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i}.png")


def test_sweep_attacks_and_scores_an_rgb_imagefolder_with_its_own_data(tmp_path):
    """The attacker learns from, and the scorer rebuilds, the edge's dataset (here 3 channels), not
    digits; the [attack] table's inverse-network and rMLE settings reach the attacker and its record."""
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

[defenses]
none = {{}}

[attack]
methods = ["inversion", "rmle"]
epochs = 1
blocks = 1
width = 8
rmle_iterations = 3
rmle_tv_weight = 0.1
""")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "deploy.sweep", "--config", str(tmp_path / "sweep.toml"), "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (point,) = json.loads((out / "results.json").read_text())["points"]
    assert point["key"].startswith("block1-b4__") and point["bottleneck"] == 4
    inversion, rmle = point["inversion_attacker"], point["rmle_attacker"]
    assert inversion["aux_dataset"] == rmle["aux_dataset"] == "imagefolder"
    assert inversion["aux_data_root"] == str(data) and inversion["aux_images"] == 40
    assert (inversion["inverse_blocks"], inversion["inverse_width"], inversion["inverse_epochs"]) == (1, 8, 1)
    assert len(inversion["inverse_loss_history"]) == 1
    assert (rmle["rmle_iterations"], rmle["rmle_tv_weight"]) == (3, 0.1)
    for method in ("inversion", "rmle"):
        scores = json.loads((out / "points" / point["key"] / f"attack-{method}" / "attack.json").read_text())
        assert scores["n_images"] == 40 and 0 < scores["ssim"] <= 1


def test_attack_table_and_per_cut_bottleneck_parse():
    config = SweepConfig.from_dict({"model": {"dataset": "cifar10", "data_root": "/d"},
                                    "grid": {"cuts": ["conv1", {"cut": "pool2", "bottleneck": 8}]},
                                    "attack": {"methods": ["rmle"], "blocks": 8, "args": ["--aux-limit", "9"]}})
    assert [(p.cut, p.bottleneck) for p in config.points()] == [("conv1", None), ("pool2", 8)]
    assert config.points()[1].key == "pool2-b8__fp32__none__s0"
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
    from deploy.sweep import with_absolute_roots

    monkeypatch.chdir(tmp_path)
    config = SweepConfig.from_dict({"model": {"dataset": "imagefolder", "data_root": "data/a"},
                                    "attack": {"aux_data_root": "../b"}})
    resolved = with_absolute_roots(config)
    assert resolved.model["data_root"] == str(tmp_path / "data" / "a")
    assert resolved.attack["aux_data_root"] == str(tmp_path.parent / "b")
    assert with_absolute_roots(config, "elsewhere").model["data_root"] == str(tmp_path / "elsewhere")
    assert config.model["data_root"] == "data/a"  # the loaded config is left as it was


def test_demo_attacker_flags_reach_the_attacker_and_the_report(tmp_path, monkeypatch):
    from deploy import demo

    tiny = replace(demo.DEMO, model={"dataset": "digits", "bottleneck": 8, "epochs": 1, "max_steps": 4},
                   codecs=("fp32",), defenses={"none": {}}, attack_args=("--aux-limit", "200"))
    monkeypatch.setattr(demo, "DEMO", tiny)
    assert demo.main(["--out", str(tmp_path), "--workers", "1", "--inverse-epochs", "1", "--inverse-width", "8",
                      "--inverse-blocks", "1"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["attacker"] == {"blocks": 1, "width": 8, "epochs": 1}
    assert "1 residual blocks, width 8, 1 epochs" in (tmp_path / "report.md").read_text()


def test_plot_labels_of_close_points_neither_overlap_nor_leave_the_axes():
    """The demo's six points once printed two labels on top of each other; points near the
    right edge ran their labels into the legends outside the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from deploy.plots import _place_labels

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
