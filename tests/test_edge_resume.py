"""A killed edge-client resumes from its --state-dir exactly as if never interrupted, and a state
that is damaged or another run's is refused by name (or, asked to, replaced by a fresh start).

The kill tests run real processes: one cloud-server, and edge-clients that SIGKILL themselves
at a chosen point (tests/crashing_edge.py) and are started again with --resume. Each ends
with the same encoder and the same server decoder, tensor for tensor, as a run never
interrupted, and the same step counts on both sides (CPU runs are deterministic). CEM (GMM)
is on, so its fit, its place in the optimizer and the global generator it seeds k-means++
from are carried over too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloud_server.checkpoints import file_stem
from cloud_server.local import LocalCloud
from edge_client import cli
from edge_client import state as state_file
from edge_client.config import DefenseConfig, DetectConfig, EdgeConfig
from edge_client.trainer import EdgeTrainer, StepsLost, run
from splitnet import checkpoint_file

TESTS = Path(__file__).parent
# 23 steps an epoch; a state at step 0, every 10 steps and at each epoch's end
RUN = ["--epochs", "2", "--batch-size", "64", "--seed", "3", "--cem", "gmm", "--lambda", "8", "--cem-warmup", "0",
       "--noise", "0.1", "--state-every", "10", "--client-id", "edge-1", "--no-progress"]


@pytest.fixture(scope="module")
def cloud(server, server_checkpoints):
    """The worker's cloud-server (conftest.py) and the folder it checkpoints its jobs in."""
    return server, server_checkpoints


def _edge(cloud, job: str, folder: Path, *extra: str, crash: str = "") -> subprocess.CompletedProcess:
    server, _ = cloud
    args = [*RUN, "--server", server.address, "--job", job, "--state-dir", str(folder / "state"),
            "--save-encoder", str(folder / "encoder.pt"), "--report", str(folder / "report.json"), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    if crash:
        env["CRASH_EDGE"] = crash
    module = "crashing_edge" if crash else "edge_client"
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _finished(cloud, job: str, folder: Path) -> tuple[dict, dict, dict]:
    """The edge's report and encoder, and the server's checkpoint of the job."""
    report = json.loads((folder / "report.json").read_text())
    encoder = torch.load(folder / "encoder.pt", weights_only=True)["encoder"]
    return report, encoder, checkpoint_file.read(cloud[1] / f"{file_stem(job)}.ckpt")


@pytest.fixture(scope="module")
def uninterrupted(cloud, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = _edge(cloud, "uninterrupted", folder)
    assert done.returncode == 0, done.stderr
    return _finished(cloud, "uninterrupted", folder)


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.parametrize("crash, resent", [
    ("step:31", 8),  # the server applied step 31, the edge never applied its gradient; last state: step 23
    ("write:3", 10),  # the state of step 20 written to its temporary file, not renamed; last state: step 10
    ("epoch:2", 0),  # epoch 1 over and its state written
])
def test_a_killed_edge_resumes_as_if_never_interrupted(cloud, uninterrupted, tmp_path, crash, resent):
    job = f"killed-{crash.replace(':', '-')}"
    killed = _edge(cloud, job, tmp_path, crash=crash)
    assert killed.returncode == -9, killed.stderr
    state_path = state_file.path_in(tmp_path / "state")
    if crash.startswith("write"):  # the previous state is whole, the new one never took its place
        assert state_path.with_suffix(".tmp").exists()
    saved = checkpoint_file.read(state_path)["trainer"]
    assert saved["step_id"] == {"step": 23, "write": 10, "epoch": 23}[crash.split(":")[0]]

    resumed = _edge(cloud, job, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    report, encoder, server = _finished(cloud, job, tmp_path)
    ref_report, ref_encoder, ref_server = uninterrupted
    _same_tensors(encoder, ref_encoder)
    _same_tensors(server["decoder"], ref_server["decoder"])
    _same_tensors(server["optimizer"], ref_server["optimizer"])
    assert report["steps"] == report["last_step_id"] == ref_report["steps"] == 46
    assert server["steps_applied"] == ref_server["steps_applied"] == 46
    assert server["client_last_step"] == {"edge-1": 46}
    assert report["resent_steps"] == resent and report["duplicate_steps"] == 0
    timeless = [{k: v for k, v in epoch.items() if k not in ("seconds", "samples_per_second")}
                for epoch in (*report["history"], *ref_report["history"])]
    assert timeless[:2] == timeless[2:]  # loss, accuracy, rate and CEM figures of each epoch
    assert report["intra_mse"] == ref_report["intra_mse"] and report["test_accuracy"] == ref_report["test_accuracy"]


@pytest.mark.slow
def test_a_killed_u_shaped_edge_resumes_as_if_never_interrupted(cloud, tmp_path):
    """The U-shaped split, killed after the server applied step 31: the resumed edge re-sends steps
    24..31, gets each one's kept output and gradient back, runs its head on the output again, and
    ends with the encoder, the server's middle and the history of a run never interrupted."""
    reference = _edge(cloud, "u-uninterrupted", tmp_path / "ref", "--u-shaped")
    assert reference.returncode == 0, reference.stderr
    killed = _edge(cloud, "u-killed", tmp_path, "--u-shaped", crash="step:31")
    assert killed.returncode == -9, killed.stderr
    resumed = _edge(cloud, "u-killed", tmp_path, "--u-shaped", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    report, encoder, server = _finished(cloud, "u-killed", tmp_path)
    ref_report, ref_encoder, ref_server = _finished(cloud, "u-uninterrupted", tmp_path / "ref")
    _same_tensors(encoder, ref_encoder)
    _same_tensors(server["decoder"], ref_server["decoder"])
    assert report["resent_steps"] == 8 and report["duplicate_steps"] == 0
    assert report["steps"] == server["steps_applied"] == 46 and report["u_shaped"]
    assert report["history"][-1]["train_loss"] == ref_report["history"][-1]["train_loss"]
    assert report["test_accuracy"] == ref_report["test_accuracy"]


# -- in-process (LocalCloud): the Python API, and states that are refused

def _config(tmp_path: Path, **changes) -> EdgeConfig:
    base = EdgeConfig(epochs=2, batch_size=64, seed=3, job="api", progress=False, state_dir=str(tmp_path),
                      defense=DefenseConfig(noise=0.1, cem="gmm", lam=8.0, cem_warmup=0))
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> bytes:
    """The state file of a short run (3 steps), written once for the module."""
    folder = tmp_path_factory.mktemp("short")
    run(_config(folder, max_steps=3), LocalCloud())
    return state_file.path_in(folder).read_bytes()


@pytest.fixture
def written(short_run, tmp_path) -> Path:
    """A copy of `short_run`'s state in this test's state folder."""
    path = state_file.path_in(tmp_path)
    path.write_bytes(short_run)
    return path


@pytest.mark.slow  # trains 4 epochs in-process
def test_the_api_resumes_between_epochs_as_if_never_interrupted(tmp_path):
    """A trainer dropped after epoch 1 and a new one resumed from its state end as one that ran on."""
    reference = EdgeTrainer(_config(tmp_path / "ref"), LocalCloud())
    reference.start()
    for _ in range(2):
        reference.train_epoch()
    cloud = LocalCloud()
    first = EdgeTrainer(_config(tmp_path / "cut"), cloud)
    first.start()
    first.train_epoch()
    second = EdgeTrainer(_config(tmp_path / "cut", resume=True), cloud)
    second.start()
    assert second.step_id == first.step_id == 23 and second.client_id == first.client_id
    second.train_epoch()
    _same_tensors(second.encoder_state(), reference.encoder_state())
    _same_tensors(second.cem.state()["module"], reference.cem.state()["module"])
    assert second.history[-1]["train_loss"] == reference.history[-1]["train_loss"]


@pytest.mark.parametrize("field, changes", [
    ("seed", {"seed": 4}), ("job", {"job": "other"}), ("batch_size", {"batch_size": 32}), ("epochs", {"epochs": 3}),
    ("arch", {"arch": "resnet20"}), ("cut", {"cut": "conv1"}), ("width", {"width": 0.5}),
    ("bottleneck", {"bottleneck": 4}),
    ("client_id", {"client_id": "someone-else"}),
])
def test_a_state_of_another_run_is_refused_naming_the_field(written, tmp_path, field, changes):
    trainer = EdgeTrainer(_config(tmp_path, max_steps=3, **changes), LocalCloud())
    with pytest.raises(state_file.StateMismatch) as refused:
        trainer.resume_from(written)
    state = checkpoint_file.read(written)
    saved = {**state["identity"], "client_id": state["client_id"]}
    now = {**state_file.identity(trainer.config, trainer.split), "client_id": trainer.config.client_id}
    assert saved[field] != now[field]
    assert str(refused.value) == (f"edge state {written}: written by a run with {field} {saved[field]!r}, "
                                  f"this run has {now[field]!r}")


ADDED_SINCE = ("adv_weight", "adv_blocks", "adv_width", "adv_every", "adv_lr", "prune_ratio", "prune_freeze")


def test_a_state_from_before_a_defense_setting_came_resumes_at_its_default(written, tmp_path):
    """A state written before attacker-aware training and pruning existed ran without them: this run
    carries it on while it leaves them off, and is refused naming the setting where it turns one on."""
    state = checkpoint_file.read(written)
    for key in ADDED_SINCE:
        del state["identity"][f"defense.{key}"]
    del state["trainer"]["adversary"]
    checkpoint_file.write(written, state)
    trainer = EdgeTrainer(_config(tmp_path, max_steps=3), LocalCloud())
    trainer.resume_from(written)
    assert trainer.step_id == 3
    pruning = EdgeTrainer(_config(tmp_path, max_steps=3, defense=DefenseConfig(noise=0.1, cem="gmm", lam=8.0,
                                                                                cem_warmup=0, prune_ratio=0.5)),
                          LocalCloud())
    with pytest.raises(state_file.StateMismatch, match="defense.prune_ratio 0.0, this run has 0.5"):
        pruning.resume_from(written)


def test_a_state_of_another_dataset_is_refused(written, tmp_path):
    trainer = EdgeTrainer(_config(tmp_path), LocalCloud())
    expected = state_file.identity(trainer.config, trainer.split) | {"dataset": "cifar10"}
    with pytest.raises(state_file.StateMismatch, match="dataset 'digits', this run has 'cifar10'"):
        state_file.read(written, expected, "")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "checksum mismatch: the file is damaged or truncated"),
    (_flip_a_bit, "checksum mismatch: the file is damaged or truncated"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(checkpoint_file.encode({"name": "a job"})),
     "not an edge state (a cloud-server job checkpoint?)"),
])
def test_a_damaged_state_is_refused_by_edge_client_in_one_line(written, damage, reason, capsys):
    damage(written)
    argv = ["--epochs", "2", "--max-steps", "3", "--batch-size", "64", "--seed", "3", "--job", "api", "--noise", "0.1",
            "--cem", "gmm", "--lambda", "8", "--cem-warmup", "0", "--state-dir", str(written.parent), "--resume",
            "--server", "127.0.0.1:1", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edge-client: error: edge state {written}: {reason}"]


def test_a_damaged_state_starts_afresh_when_asked(written, tmp_path, caplog):
    _truncate(written)
    report = run(_config(tmp_path, max_steps=2, resume=True, fresh_on_bad_state=True), LocalCloud())
    assert report["steps"] == 2 and "starting afresh" in caplog.text
    assert checkpoint_file.read(written)["trainer"]["step_id"] == 2  # the damaged file was replaced


def test_a_state_that_does_not_fit_the_model_is_refused_even_when_fresh_is_allowed(written, tmp_path):
    """Whole and this run's, but a tensor of another shape: part of it may be adopted before the
    misfit shows, so no fresh start can follow on that trainer."""
    state = checkpoint_file.read(written)
    name = next(iter(state["trainer"]["encoder"]))
    state["trainer"]["encoder"][name] = torch.zeros(1)
    checkpoint_file.write(written, state)
    with pytest.raises(state_file.StateError, match=f"{written}: does not fit this run's model"):
        run(_config(tmp_path, max_steps=3, resume=True, fresh_on_bad_state=True), LocalCloud())


def test_a_state_ahead_of_the_server_is_refused(written, tmp_path):
    """A server that lost the steps the state counts (restarted without its checkpoint): carrying on
    would renumber them, so the resumed edge stops instead."""
    with pytest.raises(StepsLost, match="the server has its steps up to 0, but it sent 3"):
        run(_config(tmp_path, max_steps=3, resume=True), LocalCloud())


def test_a_state_is_not_overwritten_without_resume(written, tmp_path):
    with pytest.raises(state_file.StateError, match="pass --resume to carry it on"):
        run(_config(tmp_path, max_steps=3), LocalCloud())


def test_a_resumed_edge_detects_as_if_never_interrupted(tmp_path):
    """With --detect splitguard: the detector's fake batches, running sums and checks carry over in the
    state, so the edge resumed after epoch 1 sends the same fake batches and scores the same as one
    that ran on (its checks, to every digit)."""
    # scores from early on, never deciding (threshold ~0): what is checked is what carries over
    detect = DetectConfig("splitguard", detect_start=4, detect_min_fakes=2, detect_threshold=1e-9)
    reference = EdgeTrainer(_config(tmp_path / "ref", detect=detect), LocalCloud())
    reference.start()
    for _ in range(2):
        reference.train_epoch()
    cloud = LocalCloud()
    first = EdgeTrainer(_config(tmp_path / "cut", detect=detect), cloud)
    first.start()
    first.train_epoch()
    assert first.detector.checks, "the first epoch already scored: there is something to carry over"
    second = EdgeTrainer(_config(tmp_path / "cut", detect=detect, resume=True), cloud)
    second.start()
    second.train_epoch()
    assert second.detector.report() == reference.detector.report()
    assert second.detector.fake_steps == reference.detector.fake_steps > first.detector.fake_steps
