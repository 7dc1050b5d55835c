"""`edge-client --infer-only`: a trained encoder and the cloud's decoder of its job answer images one
request at a time, through a real `cloud-server`; each answer comes with its latency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client import cli, infer
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import CloudError, RemoteCloud
from edge_client.trainer import run


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """An encoder trained a few steps against the server, job "infer-test"."""
    path = tmp_path_factory.mktemp("enc") / "enc.pt"
    config = EdgeConfig(connection=ConnectionConfig(server=server.address), epochs=1, max_steps=12, bottleneck=8,
                        job="infer-test", save_encoder=str(path), progress=False)
    run(config, RemoteCloud(config.connection))
    return path


def _png_folder(root: Path, count: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        folder = root / ("odd" if i % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
    (root / "notes.txt").write_text("not an image")


@pytest.mark.slow
def test_a_folder_of_images_gets_a_prediction_and_a_latency_each(server, trained, tmp_path):
    _png_folder(tmp_path / "images", 6)
    done = subprocess.run([sys.executable, "-m", "edge_client", "--infer-only", "--encoder", str(trained), "--images",
                           str(tmp_path / "images"), "--server", server.address, "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["job"] == "infer-test"  # the encoder file's job: the decoder it trained with
    assert [p["image"] for p in report["predictions"]] == [f"{d}/{i}.png" for d, i in (
        ("even", 0), ("even", 2), ("even", 4), ("odd", 1), ("odd", 3), ("odd", 5))]
    assert all(0 <= p["class"] < 10 and 0 < p["confidence"] <= 1 and p["latency_ms"] > 0
               for p in report["predictions"])
    assert (report["requests"], report["images"], report["accuracy"]) == (6, 6, None)
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p99"] and report["requests_per_second"] > 0
    assert report["bytes_up"] > 6 * 512 * 4  # six requests of 8x8x8 fp32 features, at least
    assert "6 images in 6 requests of 1: latency p50" in done.stdout


def test_the_test_split_in_small_batches_adds_an_accuracy(server, trained):
    config = EdgeConfig(connection=ConnectionConfig(server=server.address))
    report = infer.run(config, infer.InferConfig(str(trained), max_images=20, batch_size=8),
                       RemoteCloud(config.connection))
    assert (report["images"], report["requests"], report["batch_size"]) == (20, 3, 8)
    assert report["accuracy"] == sum(p["class"] == p["label"] for p in report["predictions"]) / 20
    # a batch's images share its request's latency
    assert report["predictions"][0]["latency_ms"] == report["predictions"][7]["latency_ms"]


def test_a_job_without_a_trained_decoder_is_refused_naming_the_encoders_job(server, trained):
    config = EdgeConfig(connection=ConnectionConfig(server=server.address), job="never-trained")
    with pytest.raises(CloudError, match="has applied no training step.*the file names 'infer-test'"):
        infer.run(config, infer.InferConfig(str(trained), max_images=2), RemoteCloud(config.connection))


@pytest.mark.parametrize("argv, needle", [
    (["--infer-only"], "--infer-only needs --encoder PATH"),
    (["--infer-only", "--encoder", "missing.pt"], "--encoder missing.pt: no such file"),
    (["--infer-only", "--encoder", __file__, "--images", "nowhere"], "--images nowhere: not a folder"),
    (["--infer-only", "--encoder", __file__, "--infer-batch-size", "0"], "--infer-batch-size must be >= 1"),
])
def test_bad_inference_flags_are_errors_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
