"""The U-shaped split over real servers: the edge keeps its head and its labels, the cloud runs the
middle; a step is two exchanges under one step id, applied once, replayed whole after a crash."""

import dataclasses
import signal
import threading
from pathlib import Path

import grpc
import pytest
import torch

from cloud_server.local import LocalCloud
from deploy.processes import start_server
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer, run
from splitnet import capture, codec
from splitnet.settings import InvalidSetting
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import free_port, rejected, spec, step, tensor

MIDDLE_OUT = (64, 4, 4)  # cnn from block1 to block2 (the default head cut), 16x16 input


def _config(address: str, job: str, **kw) -> EdgeConfig:
    conn = {"deadline_s": 10.0, "reconnect_s": 90.0, **kw.pop("connection", {})}
    return EdgeConfig(connection=ConnectionConfig(server=address, **conn), job=job, epochs=1, progress=False,
                      u_shaped=kw.pop("u_shaped", True), **kw)


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


def test_labels_never_travel_in_a_u_shaped_session(sweep_services):
    """On the traffic the eavesdropping proxy captured: the U-shaped session's steps carry no label,
    its gradients up are one row per example, and the vanilla session beside it sends its labels."""
    services = sweep_services
    u = run(_config(services.proxy.address, "u-labels", max_steps=4), RemoteCloud(ConnectionConfig(
        server=services.proxy.address, deadline_s=10.0)))
    vanilla = run(_config(services.proxy.address, "u-labels-vanilla", max_steps=2, u_shaped=False),
                  RemoteCloud(ConnectionConfig(server=services.proxy.address, deadline_s=10.0)))
    records = capture.read_records(services.capture)
    mine = [r for r in records if r.session_id in u["session_ids"]]
    assert {r.method for r in mine} == {"Train", "TrainGrad", "Infer"}
    assert all(r.labels == () for r in mine)
    grads = [r for r in mine if r.method == "TrainGrad"]
    assert [r.step_id for r in grads] == [1, 2, 3, 4] and all(r.shape == (64, *MIDDLE_OUT) for r in grads)
    theirs = [r for r in records if r.session_id in vanilla["session_ids"] and r.method == "Train"]
    assert len(theirs) == 2 and all(len(r.labels) == 64 for r in theirs)
    assert u["u_shaped"] and u["head_cut"] == "block2"
    # up: features, then the output's gradient (twice the features here); down: the output, then dL/dz
    assert u["bytes_up_per_step"] > vanilla["bytes_up_per_step"]


@pytest.mark.slow
def test_a_u_shaped_run_through_a_server_crash_ends_as_an_uninterrupted_one(tmp_path):
    """The server kills itself right after its second checkpoint: the pending first half and the
    reply to the checkpointed step die with it. The edge re-sends steps whole (features and the
    output's gradient), and the run ends as one without the crash."""
    port, ckpt = free_port(), str(tmp_path / "ckpt")
    args = ("--checkpoint-dir", ckpt, "--checkpoint-every", "5")
    server = start_server(*args, port=port, module="crashing_server",
                          env={"PYTHONPATH": str(Path(__file__).parent), "CRASH_AFTER_RENAME": "2"})
    config = _config(server.address, "u-crash", max_steps=16, client_id="u-crash")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run(config, RemoteCloud(config.connection))))
    worker.start()
    try:
        assert server.proc.wait(120) == -signal.SIGKILL
        server = start_server(*args, port=port)
        worker.join(300)
        assert not worker.is_alive() and result, "the client did not finish after the restart"
        assert result["reconnects"] >= 1 and result["replayed_steps"] >= 1
        assert result["steps"] == result["last_step_id"] == 16 and result["duplicate_steps"] == 0
        with grpc.insecure_channel(server.address) as channel:
            stats = split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(job="u-crash"), timeout=10)
        assert stats.jobs[0].steps_applied == 16
        uninterrupted = run(dataclasses.replace(config, job="u-crash-local"), LocalCloud())
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
