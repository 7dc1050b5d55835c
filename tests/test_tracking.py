"""`--log-dir`: the TensorBoard event files hold the numbers the reports hold.

Each test reads the events back with TensorBoard's own reader, as `tensorboard --logdir`
would, and compares them with the JSON a run wrote: a tag written under another name, at
another step, or from another figure than the report's fails here.
"""

import json
import sys

import pytest

from deploy.processes import start_server
from edge_client import cli as edge_cli
from splitnet import tracking
from tb_events import events, scalars


def test_no_log_dir_needs_no_tensorboard_and_a_log_dir_without_it_names_the_extra(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh: it meets the gap
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as where the 'track' extra is absent
    tracker = tracking.Tracker("")
    tracker.edge_epoch({"epoch": 1, "train_loss": 1.0}, {"rtt_ms_p50": 2.0})
    tracker.hparams({"codec": "fp32"}, {"test_accuracy": 0.5})
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    assert edge_cli.main(["--server", "127.0.0.1:9", "--epochs", "1", "--log-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "edge-client: error: tensorboard is not installed; it comes with the 'track' extra" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_edge_epochs_and_server_steps_match_the_report(tmp_path):
    """Two epochs on digits with CEM on, against a real cloud-server: the edge's run holds its
    history, counters and test accuracy; the server's run of the job holds every step applied."""
    logs, report_path = tmp_path / "tb", tmp_path / "edge.json"
    server = start_server("--log-dir", str(logs / "cloud"))
    try:
        assert edge_cli.main(["--server", server.address, "--job", "tracked", "--epochs", "2", "--noise", "0.1",
                              "--cem", "gmm", "--lambda", "10", "--cem-warmup", "0", "--no-progress",
                              "--report", str(report_path), "--log-dir", str(logs / "edge")]) == 0
    finally:
        server.stop()  # closes the job's writer
    report = json.loads(report_path.read_text())
    edge = events(logs / "edge")
    for key, tag in (("train_loss", "train/loss"), ("train_accuracy", "train/accuracy"), ("lr", "train/lr"),
                     ("cem_pull", "cem/pull"), ("cem_w_lr", "cem/w_lr"), ("rob_loss_mean", "cem/rob_loss")):
        expected = {r["epoch"]: r[key] for r in report["history"]}
        assert scalars(edge, tag) == pytest.approx(expected, rel=1e-6), tag  # event files hold float32
    assert scalars(edge, "test/accuracy") == pytest.approx({2: report["test_accuracy"]})
    per_sample = scalars(edge, "comm/bytes_up_per_sample")
    assert sorted(per_sample) == [1, 2] and per_sample[1] > 0
    assert per_sample[2] == pytest.approx(per_sample[1], rel=0.01)  # the same batches each epoch
    assert all(v > 0 for v in scalars(edge, "comm/rtt_ms_p50").values())

    (job_run,) = (logs / "cloud").iterdir()
    assert job_run.name.startswith("job-tracked-")
    loss = scalars(events(job_run), "server/loss")
    assert sorted(loss) == list(range(1, report["steps"] + 1))  # every step applied, numbered by the job
    per_epoch = report["steps"] // 2
    first_epoch = [loss[s] for s in range(1, per_epoch + 1)]
    # The edge weights each step by its batch (the last is smaller): close to the plain mean, not equal.
    assert sum(first_epoch) / per_epoch == pytest.approx(report["history"][0]["train_loss"], rel=0.02)


@pytest.mark.parametrize("key, tag", [("train_loss", "train/loss"), ("cem_pull", "cem/pull"),
                                      ("soft_gate_mean", "cem/soft_gate"), ("adv_mse", "adversary/mse"),
                                      ("adv_share", "adversary/share"), ("prune_kept_fraction", "prune/kept_fraction")])
def test_each_defense_diagnostic_has_its_own_section(key, tag):
    assert tracking.epoch_tag(key) == tag


def test_job_names_cannot_lead_out_of_the_log_dir(tmp_path):
    """A job name is the peer's choice: its run is a folder directly under the log dir."""
    from cloud_server.checkpoints import file_stem

    logs = tmp_path / "logs"
    jobs = tracking.JobTrackers(logs)
    jobs.step(file_stem("../../escape"), 1, 0.5, 0.25)
    jobs.close()
    (event_file,) = tmp_path.rglob("*tfevents*")
    assert event_file.parent.parent == logs
    assert scalars(events(event_file.parent), "server/accuracy") == {1: 0.25}
