"""The U-shaped split over real servers: the edge keeps its head and its labels, the cloud runs the
middle; a step is two exchanges under one step id, applied once, replayed whole after a crash."""

import dataclasses
import json
import math

import grpc
import pytest
import torch

from attacks import cli as attacker_cli
from cloud_server.local import LocalCloud
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer, run
from splitnet import capture, codec
from splitnet.settings import InvalidSetting
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from crashing_server import train_through_a_crash
from messages import FEATURES, free_port, rejected, spec, step, tensor

MIDDLE_OUT = (64, 4, 4)  # cnn from block1 to block2 (the default head cut), 16x16 input


def _config(address: str, job: str, **kw) -> EdgeConfig:
    conn = {"deadline_s": 10.0, "reconnect_s": 90.0, **kw.pop("connection", {})}
    return EdgeConfig(connection=ConnectionConfig(server=address, **conn), job=job, progress=False,
                      **{"epochs": 1, "u_shaped": True, **kw})


def _trained(config: EdgeConfig, cloud) -> EdgeTrainer:
    trainer = EdgeTrainer(config, cloud)
    trainer.start()
    trainer.train_epoch()
    trainer.close()
    return trainer


def test_a_u_shaped_run_over_grpc_takes_the_steps_of_the_in_process_vanilla_split(server):
    """The same math split in three: after 6 steps the edge's encoder equals the vanilla split's trained
    in one process, and its head equals the classifier at the end of that run's decoder."""
    config = _config(server.address, "u-equal", max_steps=6, client_id="u-eq")
    u = _trained(config, RemoteCloud(config.connection))
    vanilla_cloud = LocalCloud()
    vanilla = _trained(dataclasses.replace(config, u_shaped=False, job="u-equal-vanilla"), vanilla_cloud)
    for name, value in vanilla.encoder.state_dict().items():
        torch.testing.assert_close(u.encoder.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    classifier = vanilla_cloud.job.decoder[-1].state_dict()
    for name, value in u.head[0].state_dict().items():
        torch.testing.assert_close(value, classifier[name], rtol=1e-5, atol=1e-6, msg=name)
    assert u.history[0]["train_loss"] == pytest.approx(vanilla.history[0]["train_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def captured(sweep_services, tmp_path_factory):
    """Runs through the eavesdropping proxy (conftest.py): the U-shaped split undefended and with strong
    Gaussian noise on the gradients it sends up (2 epochs each), and the vanilla split (2 steps)."""
    address = sweep_services.proxy.address

    def edge(job: str, **kw) -> dict:
        return run(_config(address, job, **kw), RemoteCloud(ConnectionConfig(server=address, deadline_s=10.0)))

    return sweep_services.capture, {
        "u": edge("u-labels", epochs=2), "noised": edge("u-labels-noised", epochs=2, label_defense="gaussian",
                                                        label_defense_strength=4.0),
        "vanilla": edge("u-labels-vanilla", max_steps=2, u_shaped=False)}


def test_labels_never_travel_in_a_u_shaped_session(captured):
    """On the traffic the proxy captured: the U-shaped session's steps carry no label, its gradients
    up are one row per example, and the vanilla session beside it sends its labels."""
    folder, reports = captured
    u, vanilla = reports["u"], reports["vanilla"]
    records = capture.read_records(folder)
    mine = [r for r in records if r.session_id in u["session_ids"]]
    assert {r.method for r in mine} == {"Train", "TrainGrad", "Infer"}
    assert all(r.labels == () for r in mine)
    grads = [r for r in mine if r.method == "TrainGrad"]
    assert [r.step_id for r in grads] == list(range(1, 47)) and all(r.shape[1:] == MIDDLE_OUT for r in grads)
    theirs = [r for r in records if r.session_id in vanilla["session_ids"] and r.method == "Train"]
    assert len(theirs) == 2 and all(len(r.labels) == 64 for r in theirs)
    assert u["u_shaped"] and u["head_cut"] == "block2" and not vanilla["u_shaped"]
    # U: up the features and the output's gradient, down the output and dL/dz; vanilla: features up, dL/dz down
    per_sample = {"u": 4 * (math.prod(FEATURES) + math.prod(MIDDLE_OUT)), "vanilla": 4 * math.prod(FEATURES)}
    for mode, report in (("u", u), ("vanilla", vanilla)):
        for way in ("up", "down"):
            sent = report[f"bytes_{way}_per_step"] * report["steps"]
            assert sent == pytest.approx(per_sample[mode] * report["train_samples"], rel=0.01), (mode, way)


def test_the_cloud_infers_the_labels_from_the_gradients_unless_they_are_noised(captured, tmp_path):
    """`attacker labels` on the captured traffic, one known label per class per batch: the direction
    attack names nearly every label of the undefended run, and few of the noised one."""
    folder, reports = captured
    scores = {}
    for name in ("u", "noised"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(reports[name]))
        assert attacker_cli.main(["labels", "--capture", str(folder), "--edge-report", str(path),
                                  "--out", str(tmp_path / name)]) == 0
        scores[name] = json.loads((tmp_path / name / "labels.json").read_text())
    undefended, noised = scores["u"], scores["noised"]
    assert undefended["steps"] == 46 and undefended["known_per_class"] == 1
    assert undefended["pooled"]["direction_accuracy"] >= 0.9
    assert undefended["per_epoch"][0]["nearest_known_accuracy"] >= 0.9
    assert noised["pooled"]["direction_accuracy"] < 0.5 and noised["per_step"]["nearest_known_accuracy"] < 0.5
    vanilla = tmp_path / "vanilla.json"
    vanilla.write_text(json.dumps(reports["vanilla"]))
    assert attacker_cli.main(["labels", "--capture", str(folder), "--edge-report", str(vanilla),
                              "--out", str(tmp_path / "v")]) == 2  # its labels crossed in clear: refused


@pytest.mark.slow
def test_a_u_shaped_run_through_a_server_crash_ends_as_an_uninterrupted_one(tmp_path):
    """The server kills itself right after its second checkpoint: the pending first half and the
    reply to the checkpointed step die with it. The edge re-sends steps whole (features and the
    output's gradient), and the run ends as one without the crash."""
    result, server = train_through_a_crash(tmp_path / "ckpt", free_port(),
                                           lambda address: _config(address, "u-crash", max_steps=16, client_id="u-crash"))
    try:
        assert result["reconnects"] >= 1 and result["replayed_steps"] >= 1
        assert result["steps"] == result["last_step_id"] == 16 and result["duplicate_steps"] == 0
        with grpc.insecure_channel(server.address) as channel:
            stats = split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(job="u-crash"), timeout=10)
        assert stats.jobs[0].steps_applied == 16
        uninterrupted = run(_config("", "u-crash-local", max_steps=16, client_id="u-crash"), LocalCloud())
        assert result["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
        assert result["test_accuracy"] == uninterrupted["test_accuracy"]
    finally:
        server.stop()


def _u_step(sid: str, step_id: int, features=None, output_grad=None, labels=()) -> pb.TrainStep:
    return pb.TrainStep(session_id=sid, step_id=step_id, features=features, output_grad=output_grad,
                        labels=list(labels))


def test_a_u_shaped_session_refuses_what_it_cannot_take_and_keeps_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        err = rejected(lambda: stub.OpenSession(spec("u-bad-cut", head_cut="conv1"), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "head_cut" in err.details()
        session = stub.OpenSession(spec("u-refusals", head_cut="block2"), timeout=10)
        assert session.u_shaped
        sid = session.session_id

        def train(*steps):
            return list(stub.Train(iter(steps), timeout=10))

        cases = [
            (_u_step(sid, 1, tensor(), labels=[0, 1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
            (_u_step(sid, 1), grpc.StatusCode.INVALID_ARGUMENT, "features"),
            (_u_step(sid, 1, output_grad=codec.encode(torch.ones(4, *MIDDLE_OUT), "fp32")),
             grpc.StatusCode.FAILED_PRECONDITION, "first half"),
            (_u_step(sid, 1, tensor(), codec.encode(torch.ones(4, 3), "fp32")), grpc.StatusCode.INVALID_ARGUMENT,
             "output_grad.shape"),
            (_u_step(sid, 1, tensor(), codec.encode(torch.ones(3, *MIDDLE_OUT), "fp32")),
             grpc.StatusCode.INVALID_ARGUMENT, "output_grad: 3 rows for a batch of 4"),
        ]
        for request, code, words in cases:
            err = rejected(lambda: train(request))
            assert err.code() == code and words in err.details(), (words, err.details())
        first, = train(_u_step(sid, 1, tensor()))
        output = codec.decode(first.output, "output")
        assert output.shape == (4, *MIDDLE_OUT) and not first.HasField("grad") and first.job_steps_applied == 0
        second, = train(_u_step(sid, 1, output_grad=codec.encode(torch.ones_like(output), "fp32")))
        assert codec.decode(second.grad, "grad").shape == (4, 32, 8, 8) and second.job_steps_applied == 1
        again, = train(_u_step(sid, 1, tensor()))  # a first half of an applied step: its kept reply
        assert again.duplicate and torch.equal(codec.decode(again.output, "output"), output)
        vanilla = stub.OpenSession(spec("u-vanilla-beside"), timeout=10).session_id
        err = rejected(lambda: train(_u_step(vanilla, 1, tensor(), codec.encode(torch.ones(4, 1), "fp32"),
                                             labels=[0, 1, 2, 3])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "output_grad" in err.details()
        assert not train(step(vanilla, 1))[0].duplicate  # the server still serves the vanilla split


def test_the_u_shaped_settings_are_checked_where_they_are_made():
    with pytest.raises(InvalidSetting, match="head_cut"):
        EdgeConfig(head_cut="block2")
    with pytest.raises(InvalidSetting, match="pipeline"):
        EdgeConfig(u_shaped=True, connection=ConnectionConfig(pipeline=2))
    with pytest.raises(InvalidSetting, match="label_defense"):
        EdgeConfig(label_defense="gaussian", label_defense_strength=1.0)
    with pytest.raises(InvalidSetting, match="head_cut"):
        EdgeConfig(u_shaped=True, head_cut="conv1")
    assert EdgeConfig(u_shaped=True).split_head_cut() == "block2"


def test_a_sweep_takes_the_split_as_an_axis_and_scores_the_labels(sweep_services, tmp_path):
    """`u_shaped = [false, true]` in [grid]: both points train and are inverted as before; the U-shaped
    one's row adds the cloud's label inference, which the vanilla row (labels in clear) has not."""
    from sweeps import sweep_here

    (tmp_path / "sweep.toml").write_text("""
[model]
epochs = 1
max_steps = 12

[grid]
u_shaped = [false, true]

[attack]
epochs = 1
blocks = 1
""")
    out = tmp_path / "out"
    done = sweep_here(["--config", str(tmp_path / "sweep.toml"), "--out", str(out)], sweep_services)
    assert done.returncode == 0, done.stderr[-3000:]
    vanilla, u = json.loads((out / "results.json").read_text())["points"]
    assert vanilla["axes"]["u_shaped"] is False and u["axes"]["u_shaped"] is True
    assert "label_direction_accuracy" not in vanilla
    assert 0 <= u["label_direction_accuracy"] <= 1 and u["label_pooled_accuracy"] > 0.5
    assert u["inversion_mse"] > 0 and vanilla["inversion_mse"] > 0


@pytest.mark.slow
def test_split_ray_trains_the_u_shaped_split_with_the_heads_averaged(ray_local, server):
    """SplitFed over three virtual clients on two workers: the heads travel with the encoders (their
    states between turns) and are averaged with them;
    every step is applied once, and the model learns (a head left behind scored 0.09-0.46)."""
    from deploy.sim.config import RayRunConfig, VirtualClients
    from deploy.sim.run import run_clients
    from ray_cluster import edge

    config = dataclasses.replace(edge(server, "u-ray", epochs=2), u_shaped=True)
    report = run_clients(RayRunConfig(config, clients=3, mode="splitfed", virtual=VirtualClients(2)))
    clients = report["client_reports"]
    assert not report["failed"] and all(c["status"] == "ok" for c in clients)
    assert report["server_steps_applied"] == report["client_steps_sent"] == sum(c["steps"] for c in clients)
    assert len({c["test_accuracy"] for c in clients}) == 1 and report["test_accuracy"] >= 0.7
