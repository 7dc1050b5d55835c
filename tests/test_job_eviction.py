"""Jobs in memory stay few: with --checkpoint-dir, a job with no open session and no step for
--job-idle-seconds is checkpointed and dropped, and its next OpenSession loads it again
exactly where it was; a restart loads no job until it is opened, so --max-jobs holds."""

import contextlib
import time

import grpc
import pytest

from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import rejected, spec, step, tensor, wait_until

IDLE_S = 0.4


@contextlib.contextmanager
def _serving(**config):
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5, **config))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield server, split_pb2_grpc.SplitLearningStub(channel)
    finally:
        server.stop()


@pytest.fixture
def cloud(tmp_path):
    with _serving(checkpoint_dir=str(tmp_path), job_idle_s=IDLE_S) as served:
        yield served


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
    assert wait_until(lambda: "idle" not in server.servicer.jobs and not server.servicer.budget.held_mb)
    assert server.servicer.checkpointer.path("idle").exists()
    listed = stub.Stats(pb.StatsRequest(job="idle"), timeout=10).jobs  # from its checkpoint
    assert [(j.steps_applied, j.sessions_open, dict(j.client_last_step)) for j in listed] == [(3, 0, {"c": 3})]

    session = stub.OpenSession(spec("idle"), timeout=10)
    assert session.resumed and session.last_step_id == 3 and session.job_steps_applied == 3
    assert _state(server, "idle") == before
    reply = list(stub.Train(iter([step(session.session_id, 4, tensor(2))]), timeout=30))[0]
    assert not reply.duplicate and reply.job_steps_applied == 4


def test_a_step_that_reaches_an_evicted_job_is_refused_then_replayed_not_lost(cloud):
    """The narrow race: a Train call looked its session up just before the client closed it,
    and its step reaches the job after eviction took it out of memory. Applied to that
    object it would be lost (the checkpoint is already written); it is refused as
    UNAVAILABLE instead, which the edge answers by re-opening and replaying it."""
    server, stub = cloud
    sid = stub.OpenSession(spec("race"), timeout=10).session_id
    list(stub.Train(iter([step(sid, i) for i in (1, 2)]), timeout=30))
    session = server.servicer.sessions[sid]
    stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)
    assert wait_until(lambda: "race" not in server.servicer.jobs)
    server.servicer.sessions[sid] = session  # the lookup that happened before the close
    err = rejected(lambda: list(stub.Train(iter([step(sid, 3)]), timeout=30)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "re-open" in err.details()
    assert session.job.steps_applied == 2  # the evicted object did not take the step
    del server.servicer.sessions[sid]

    again = stub.OpenSession(spec("race"), timeout=10)
    assert again.resumed and again.last_step_id == 2  # reloaded from the eviction checkpoint
    reply = list(stub.Train(iter([step(again.session_id, 3)]), timeout=30))[0]
    assert not reply.duplicate and reply.job_steps_applied == 3


def test_a_job_with_an_open_session_stays(cloud):
    server, stub = cloud
    sid = stub.OpenSession(spec("held"), timeout=10).session_id
    list(stub.Train(iter([step(sid, 1)]), timeout=30))
    time.sleep(IDLE_S * 4)
    assert "held" in server.servicer.jobs
    assert server.servicer.evict_idle() == []
    stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)
    assert wait_until(lambda: "held" not in server.servicer.jobs)


def test_without_a_checkpoint_folder_no_job_is_evicted():
    """Eviction would lose the job's training: without --checkpoint-dir jobs stay."""
    with _serving(job_idle_s=IDLE_S) as (server, stub):
        sid = stub.OpenSession(spec("kept"), timeout=10).session_id
        list(stub.Train(iter([step(sid, 1)]), timeout=30))
        stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)
        time.sleep(IDLE_S * 2)
        assert server.servicer.evict_idle() == [] and "kept" in server.servicer.jobs


def test_a_restart_loads_checkpoints_on_demand_within_max_jobs(tmp_path):
    with _serving(checkpoint_dir=str(tmp_path), job_idle_s=0) as (_, stub):
        for job in ("a", "b", "c"):
            sid = stub.OpenSession(spec(job), timeout=10).session_id
            list(stub.Train(iter([step(sid, 1)]), timeout=30))
    with _serving(checkpoint_dir=str(tmp_path), job_idle_s=IDLE_S, max_jobs=1) as (server, stub):
        assert server.servicer.jobs == {}  # three checkpoints, none loaded
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
        assert {(j.job, j.steps_applied, j.client_last_step["c"]) for j in stats.jobs} == {
            ("a", 1, 1), ("b", 1, 1), ("c", 1, 1)}
        first = stub.OpenSession(spec("a"), timeout=10)
        assert first.resumed and first.last_step_id == 1 and list(server.servicer.jobs) == ["a"]
        err = rejected(lambda: stub.OpenSession(spec("b"), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-jobs" in err.details()
        stub.CloseSession(pb.CloseRequest(session_id=first.session_id), timeout=10)
        assert wait_until(lambda: not server.servicer.jobs and not server.servicer.budget.held_mb)
        second = stub.OpenSession(spec("b"), timeout=10)
        assert second.resumed and second.last_step_id == 1 and list(server.servicer.jobs) == ["b"]
