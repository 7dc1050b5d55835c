"""Job creation is bounded in memory and never stalls other jobs.

A new job's memory is estimated on torch's meta device before anything is built, and
refused at once with RESOURCE_EXHAUSTED if it exceeds --job-memory-mb or would take the
jobs held past --max-memory-mb. An allowed job that is slow to build is built outside the
servicer's lock, so other clients keep stepping meanwhile."""

import math
import threading
import time

import grpc
import pytest
import torch

from cloud_server.checkpoints import Checkpointer
from cloud_server.config import ServerConfig
from cloud_server.job import Job
from cloud_server.server import CloudServer
from cloud_server.servicer import SplitLearningServicer
from splitnet.models import OptimSpec
from splitnet.v1 import split_pb2_grpc

from messages import rejected, spec, step

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# About 1.4 GB and seconds to build for real; estimated at some 170 GiB with a batch of 64.
COSTLY = dict(cut="conv1", input_shape=[1, 1024, 1024], bottleneck=128, feature_shape=[128, 1024, 1024])
BUILD_S = 2.0


def _serve(servicer_cls: type[SplitLearningServicer] = SplitLearningServicer, **config):
    """An in-process server and a stub to it, for as long as the fixture lives."""
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5, **config), servicer_cls=servicer_cls)
    port = server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, split_pb2_grpc.SplitLearningStub(channel)
    server.stop()


@pytest.fixture
def cloud(request):
    yield from _serve(**getattr(request, "param", {}))


def test_a_costly_job_is_refused_at_once_naming_its_estimate_the_budget_and_the_flag(cloud):
    server, stub = cloud
    started = time.monotonic()
    err = rejected(lambda: stub.OpenSession(spec("costly", **COSTLY), timeout=30))
    elapsed = time.monotonic() - started
    assert err.code() == EXHAUSTED, err.details()
    assert elapsed < 0.5, f"refusing took {elapsed:.2f} s: was the model built?"
    for text in ("input_shape", "needs an estimated 169,985.2 MiB", "per-job budget of 1024 MiB",
                 "cloud-server --job-memory-mb"):
        assert text in err.details(), err.details()
    assert "costly" not in server.servicer.jobs and server.servicer.budget.held_mb == 0
    assert not len(server.servicer._job_names)  # no lock entry is left for the refused name
    stub.OpenSession(spec("small"), timeout=10)  # the server goes on serving


@pytest.mark.parametrize("cloud", [dict(job_memory_mb=12, max_memory_mb=12)], indirect=True)
def test_jobs_held_together_stay_within_max_memory(cloud):
    server, stub = cloud
    stub.OpenSession(spec("first"), timeout=10)  # the default model: about 8.5 MiB
    err = rejected(lambda: stub.OpenSession(spec("second"), timeout=10))
    assert err.code() == EXHAUSTED and "cloud-server --max-memory-mb" in err.details(), err.details()
    assert "already hold 8.5 of the 12 MiB" in err.details(), err.details()
    stub.OpenSession(spec("first", client="other"), timeout=10)  # joining a held job costs nothing


def test_a_refused_first_session_gives_its_memory_back(cloud):
    server, stub = cloud
    err = rejected(lambda: stub.OpenSession(spec("wrong", feature_shape=[1, 2, 3]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.servicer.budget.held_mb == 0 and "wrong" not in server.servicer.jobs


class SlowBuild(SplitLearningServicer):
    """Stands in for an allowed model that takes BUILD_S seconds to build; counts the builds."""

    builds = 0

    def _new_job(self, request, *args):
        if request.job == "slow":
            type(self).builds += 1
            time.sleep(BUILD_S)
        return super()._new_job(request, *args)


@pytest.fixture
def slow_cloud():
    yield from _serve(SlowBuild)


def test_building_a_slow_job_stalls_no_other_job(slow_cloud):
    server, stub = slow_cloud
    sid = stub.OpenSession(spec("honest"), timeout=10).session_id
    opened: dict[str, str] = {}

    def open_slow(client: str) -> None:
        opened[client] = stub.OpenSession(spec("slow", client=client), timeout=30).session_id

    builders = [threading.Thread(target=open_slow, args=(c,)) for c in ("a", "b")]  # two sessions, one new job
    for t in builders:
        t.start()
    time.sleep(0.2)  # the build is under way
    latencies: list[float] = []
    other_open = time.monotonic()
    stub.OpenSession(spec("other"), timeout=10)
    other_open = time.monotonic() - other_open
    step_id = 0
    while any(t.is_alive() for t in builders):
        step_id += 1
        started = time.monotonic()
        list(stub.Train(iter([step(sid, step_id)]), timeout=30))
        latencies.append(time.monotonic() - started)
    for t in builders:
        t.join()

    slowest = max(latencies, default=math.inf)
    print(f"{len(latencies)} honest steps during a {BUILD_S} s build; slowest {slowest * 1000:.0f} ms; "
          f"OpenSession of another job {other_open * 1000:.0f} ms")
    assert other_open < BUILD_S / 4 and len(latencies) >= 5 and slowest < BUILD_S / 4
    assert SlowBuild.builds == 1 and sorted(opened) == ["a", "b"]
    sessions = server.servicer.sessions
    assert sessions[opened["a"]].job is sessions[opened["b"]].job is server.servicer.jobs["slow"]


def test_jobs_built_at_the_same_time_get_their_own_seeds_weights():
    """Found by the fuzz test: builds off the servicer's lock ran at once, and torch's fork_rng
    put the global generator back under another build's feet, so a job's first weights were
    not its seed's (see `splitnet.models.private_rng`)."""
    servicer = SplitLearningServicer(Checkpointer(None, 50))
    start = threading.Barrier(8)

    def open_job(seed: int) -> None:
        start.wait()
        servicer._open(spec(f"seed-{seed}", seed=seed), caller="")

    threads = [threading.Thread(target=open_job, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for seed in range(8):
        alone = Job("alone", servicer.jobs[f"seed-{seed}"].spec, OptimSpec(), seed=seed)
        for (name, built), expected in zip(servicer.jobs[f"seed-{seed}"].decoder.state_dict().items(),
                                           alone.decoder.state_dict().values()):
            assert torch.equal(built, expected), f"job seed-{seed}: {name} is not its seed's"
