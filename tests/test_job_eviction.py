"""Idle jobs leave memory: with --checkpoint-dir, a job with no open session and no step for
--job-idle-seconds is checkpointed and dropped, and its next OpenSession loads it again
exactly where it was."""

import time

import grpc
import pytest

from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import spec, step, tensor

IDLE_S = 0.4


@pytest.fixture
def cloud(tmp_path):
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5, checkpoint_dir=str(tmp_path), job_idle_s=IDLE_S))
    port = server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, split_pb2_grpc.SplitLearningStub(channel)
    server.stop()


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _state(server: CloudServer, job: str) -> list[bytes]:
    decoder = server.servicer.jobs[job].decoder
    return [t.contiguous().numpy().tobytes() for t in decoder.state_dict().values()]


def test_an_idle_job_is_evicted_and_reloaded_where_it_was(cloud):
    server, stub = cloud
    sid = stub.OpenSession(spec("idle"), timeout=10).session_id
    list(stub.Train(iter([step(sid, i) for i in (1, 2, 3)]), timeout=30))
    before = _state(server, "idle")
    stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)

    # the job leaves `jobs` first, then its checkpoint is written and its memory given back
    assert _wait_until(lambda: "idle" not in server.servicer.jobs and not server.servicer.budget.held_mb)
    assert server.servicer.checkpointer.path("idle").exists()
    assert "idle" not in {j.job for j in stub.Stats(pb.StatsRequest(), timeout=10).jobs}

    session = stub.OpenSession(spec("idle"), timeout=10)
    assert session.resumed and session.last_step_id == 3 and session.job_steps_applied == 3
    assert _state(server, "idle") == before
    reply = list(stub.Train(iter([step(session.session_id, 4, tensor(2))]), timeout=30))[0]
    assert not reply.duplicate and reply.job_steps_applied == 4


def test_a_job_with_an_open_session_stays(cloud):
    server, stub = cloud
    sid = stub.OpenSession(spec("held"), timeout=10).session_id
    list(stub.Train(iter([step(sid, 1)]), timeout=30))
    time.sleep(IDLE_S * 4)
    assert "held" in server.servicer.jobs
    assert server.servicer.evict_idle() == []
    stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)
    assert _wait_until(lambda: "held" not in server.servicer.jobs)


def test_without_a_checkpoint_folder_no_job_is_evicted():
    """Eviction would lose the job's training: without --checkpoint-dir jobs stay."""
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5, job_idle_s=IDLE_S))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            sid = stub.OpenSession(spec("kept"), timeout=10).session_id
            list(stub.Train(iter([step(sid, 1)]), timeout=30))
            stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)
            time.sleep(IDLE_S * 2)
            assert server.servicer.evict_idle() == [] and "kept" in server.servicer.jobs
    finally:
        server.stop()
