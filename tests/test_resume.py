"""A server killed mid-training restarts from its checkpoint and the client carries on,
with every step applied exactly once (the server's step counter equals the client's), and
the edge applies the gradient of every step the decoder applied."""

import dataclasses
import signal
import threading
import time

import grpc
import pytest

from cloud_server.local import LocalCloud
from deploy.processes import start_server
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from crashing_server import train_through_a_crash
from messages import free_port


def _job_stats(address: str, job: str) -> pb.JobStats | None:
    with grpc.insecure_channel(address) as channel:
        stats = split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(job=job), timeout=5)
    return stats.jobs[0] if stats.jobs else None


class _RateRecorder(RemoteCloud):
    """Records the learning rate the decoder reports for every step whose gradient the edge applies."""

    def __init__(self, config: ConnectionConfig) -> None:
        super().__init__(config)
        self.rates: dict[int, float] = {}

    def collect(self, step_id: int):
        reply = super().collect(step_id)
        if reply.grad is not None:
            self.rates[step_id] = reply.lr
        return reply


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [0, 3])
def test_kill_9_restart_and_continue(tmp_path, pipeline):
    """Also: the decoder follows the edge's schedule step for step across the crash (the rate
    drops tenfold at epoch 1; the server that restarted from the checkpoint keeps the drop)."""
    port, ckpt = free_port(), str(tmp_path / "ckpt")
    args = ("--checkpoint-dir", ckpt, "--checkpoint-every", "5")
    server = start_server(*args, port=port)
    config = EdgeConfig(connection=ConnectionConfig(server=server.address, deadline_s=10, reconnect_s=90,
                                                    pipeline=pipeline),
                        epochs=2, job="crash", client_id="edge-1", progress=False, lr_schedule="multistep:1:0.1")
    result: dict = {}
    cloud = _RateRecorder(config.connection)
    worker = threading.Thread(target=lambda: result.update(run(config, cloud)))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while (_job_stats(server.address, "crash") or pb.JobStats()).steps_applied < 12:
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.05)
        server.stop(signal.SIGKILL)
        server = start_server(*args, port=port)
        worker.join(300)
        assert not worker.is_alive() and result, "the client did not finish after the restart"
        job = _job_stats(server.address, "crash")
        assert result["reconnects"] >= 1
        assert job.steps_applied == result["steps"] == result["last_step_id"]
        assert dict(job.client_last_step) == {"edge-1": result["steps"]}
        assert result["test_accuracy"] > 0.5
        # a step in flight at the kill and already in the checkpoint comes back with its kept gradient
        assert result["duplicate_steps"] == 0
        per_epoch = result["lr_schedule"]["steps_per_epoch"]
        assert result["lr_mismatch_steps"] == 0 and len(cloud.rates) == result["steps"] - result["duplicate_steps"]
        for step_id, lr in cloud.rates.items():
            assert lr == pytest.approx(config.lr * (1.0 if step_id <= per_epoch else 0.1))
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_rejoining_client_continues(tmp_path):
    port, ckpt = free_port(), str(tmp_path / "ckpt")
    server = start_server("--checkpoint-dir", ckpt, "--checkpoint-every", "1000", port=port)
    config = EdgeConfig(connection=ConnectionConfig(server=server.address), epochs=1, max_steps=7, job="term",
                        client_id="edge-2", progress=False)
    try:
        first = run(config, RemoteCloud(config.connection))
        assert server.stop(signal.SIGTERM) == 0
        server = start_server("--checkpoint-dir", ckpt, port=port)
        with grpc.insecure_channel(server.address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            assert stub.Stats(pb.StatsRequest(job="term"), timeout=5).jobs[0].steps_applied == 7
        second = run(config, RemoteCloud(config.connection))
        assert first["last_step_id"] == 7 and second["last_step_id"] == 14
        assert _job_stats(server.address, "term").steps_applied == 14
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [0, 2])
def test_kill_9_right_after_a_checkpoint_rename_loses_no_update(tmp_path, pipeline):
    """The server kills itself right after writing the checkpoint of job step 10, before the
    reply to step 10 leaves (and, pipelined, with earlier replies maybe undelivered). The
    restarted server answers the re-sent steps it had applied with their checkpointed
    gradients, so the run ends as an uninterrupted one does."""
    def edge(address: str) -> EdgeConfig:
        return EdgeConfig(connection=ConnectionConfig(server=address, deadline_s=10, reconnect_s=90, pipeline=pipeline),
                          epochs=1, max_steps=20, job="renamed", client_id="edge-1", progress=False)

    result, server = train_through_a_crash(tmp_path / "ckpt", free_port(), edge)
    try:
        job = _job_stats(server.address, "renamed")
        assert result["reconnects"] >= 1 and job.steps_applied == result["steps"] == 20
        assert result["duplicate_steps"] == 0, "the edge missed the gradient of a step the decoder applied"
        uninterrupted = run(dataclasses.replace(edge(server.address), job="renamed-local"), LocalCloud())
        assert abs(result["test_accuracy"] - uninterrupted["test_accuracy"]) <= 0.005
        assert result["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-4)
    finally:
        server.stop()


@pytest.mark.slow
def test_kill_9_after_the_edge_finished_loses_no_step(tmp_path):
    """13 steps with a checkpoint every 5: the scheduled ones hold step 10 at most, so the edge
    finishes only once the server has checkpointed step 13 for it."""
    port, ckpt = free_port(), str(tmp_path / "ckpt")
    args = ("--checkpoint-dir", ckpt, "--checkpoint-every", "5")
    server = start_server(*args, port=port)
    config = EdgeConfig(connection=ConnectionConfig(server=server.address), epochs=1, max_steps=13, job="tail",
                        client_id="edge-3", progress=False)
    try:
        result = run(config, RemoteCloud(config.connection))
        server.stop(signal.SIGKILL)
        server = start_server(*args, port=port)
        job = _job_stats(server.address, "tail")
        assert dict(job.client_last_step) == {"edge-3": 13} and job.steps_applied == 13
        assert result["durable"] and result["durable_step_id"] == result["last_step_id"] == 13
    finally:
        server.stop()
