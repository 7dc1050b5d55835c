"""A sweep killed with SIGKILL mid-training (the sweep, its server, proxy and edge-client at once,
as when a machine goes away) resumes the point from the edge's state and the server's checkpoint,
and ends exactly where an uninterrupted sweep ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from deploy.processes import descendants
from sweeps import sweep_here

CONFIG = """
[model]
bottleneck = 4
epochs = 3
batch_size = 32
noise = 0.1

[defenses]
"gmm" = {cem = "gmm", lambda = 4, cem_warmup = 0}

[attack]
methods = []
"""


def sweep(config, out) -> list[str]:
    return [sys.executable, "-m", "deploy.experiments.sweep", "--config", str(config), "--out", str(out)]


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_point_as_if_never_interrupted(tmp_path, sweep_services):
    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted sweep in this process, on the worker's server and proxy (tests/sweeps.py: a job
    # starts from its seed's weights whatever server holds it); the killed one with services of its own.
    done = sweep_here(["--config", str(config), "--out", str(whole)], sweep_services)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(sweep(config, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        logs = []
        while time.monotonic() < deadline:  # into the second epoch, between two of its states
            logs = list(killed.glob("points/*/edge-client.log"))
            if logs and "epoch 1:" in logs[0].read_text():
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the point never finished its first epoch")
        time.sleep(0.5)
    finally:
        for pid in descendants(proc.pid) | {proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
    (point,) = (killed / "points").iterdir()
    assert not (point / "result.json").exists() and (point / "state" / "edge-state.ckpt").exists()

    done = subprocess.run(sweep(config, killed), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed client" in (point / "edge-client.log").read_text(), done.stderr[-3000:]
    mine, theirs = (json.loads((d / "points" / point.name / "edge.json").read_text()) for d in (killed, whole))
    assert mine["steps"] == theirs["steps"] and mine["duplicate_steps"] == 0
    assert mine["test_accuracy"] == theirs["test_accuracy"]
    assert [h["train_loss"] for h in mine["history"]] == [h["train_loss"] for h in theirs["history"]]
    a, b = (torch.load(d / "points" / point.name / "encoder.pt", weights_only=True)["encoder"] for d in (killed, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
