"""Every defense runs through the edge trainer on digits and on an ImageFolder tree."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cloud_server.local import LocalCloud
from edge_client.config import EdgeConfig
from edge_client.config import DefenseConfig
from edge_client.trainer import run
from splitnet import data

DEFENSES = {
    "noise": DefenseConfig(noise=0.1),
    "laplace": DefenseConfig(noise=0.1, noise_kind="laplace"),
    "dropout": DefenseConfig(dropout=0.2),
    "topk": DefenseConfig(topk=0.5),
    "nopeek": DefenseConfig(nopeek=1.0),
    "gmm": DefenseConfig(noise=0.1, cem="gmm", lam=16, cem_warmup=0),
    "gated": DefenseConfig(noise=0.1, cem="gated", lam=16, cem_warmup=0),
    "slot": DefenseConfig(noise=0.1, cem="slot", lam=16, cem_warmup=0),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs", "owls")):
        (root / name).mkdir()
        for i in range(16):
            pixels = (rng.random((20, 20, 3)) * 80 + c * 80).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _small(spec: data.DataSpec, n: int = 96) -> tuple[data.Splits, torch.utils.data.Dataset]:
    splits = data.load(spec)
    return splits, torch.utils.data.Subset(splits.train, range(min(n, len(splits.train))))


@pytest.mark.parametrize("name", sorted(DEFENSES))
@pytest.mark.parametrize("dataset", ["digits", "imagefolder"])
def test_defense_trains_and_reports(name, dataset, image_folder):
    spec = data.DataSpec(dataset, str(image_folder) if dataset == "imagefolder" else "", image_size=16)
    splits, train = _small(spec)
    config = EdgeConfig(epochs=2, batch_size=32, bottleneck=8, defense=DEFENSES[name], data=spec, progress=False)
    report = run(config, LocalCloud(), splits, train)
    assert math.isfinite(report["train_loss"]) and 0 <= report["test_accuracy"] <= 1
    assert report["defense"]["cem"] == DEFENSES[name].cem and report["intra_mse"] >= 0
    if DEFENSES[name].cem != "none":
        last = report["history"][-1]
        assert last["cem_active"] and math.isfinite(last["rob_loss_mean"])
        assert report["cem_nan_count"] == 0


@pytest.mark.slow
def test_edge_client_cli_runs_slot_cem_on_an_image_folder(server, image_folder, tmp_path):
    path = tmp_path / "edge.json"
    done = subprocess.run([sys.executable, "-m", "edge_client", "--server", server.address, "--dataset",
                           "imagefolder", "--data-root", str(image_folder), "--image-size", "16", "--bottleneck", "8",
                           "--noise", "0.1", "--cem", "slot", "--lambda", "16", "--cem-warmup", "0", "--epochs", "2",
                           "--batch-size", "16", "--job", "folder-slot", "--report", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(path.read_text())
    assert report["dataset"] == "imagefolder" and report["feature_shape"] == [8, 8, 8]
    assert report["defense"]["cem"] == "slot" and "early_shutoff_steps" in report
