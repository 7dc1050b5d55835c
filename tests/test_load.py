"""Load: 8 concurrent clients x 200 steps against one server process on loopback.

Every update must be applied exactly once (the server's Stats agree with what the
clients got back) and the p99 step latency is printed (`pytest -s` shows it)."""

import threading
import time

import grpc
import pytest

from benchmarks.soak import LoadClient
from edge_client.report import percentile
from deploy.processes import start_server
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

CLIENTS, STEPS = 8, 200


@pytest.mark.slow
def test_eight_clients_two_hundred_steps_each_applied_exactly_once():
    server = start_server("--threads", "1")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            clients = [LoadClient(stub, "load", f"c{i}") for i in range(CLIENTS)]
            errors: list[BaseException] = []

            def drive(client: LoadClient) -> None:
                try:
                    client.run(steps=STEPS)
                except BaseException as err:  # reported below, with the others' results
                    errors.append(err)

            threads = [threading.Thread(target=drive, args=(c,)) for c in clients]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            seconds = time.perf_counter() - started
            stats = stub.Stats(pb.StatsRequest(job="load"), timeout=30)
    finally:
        server.stop()
    assert not errors, errors
    latencies = [ms for c in clients for ms in c.latency_ms]
    print(f"\nload: {CLIENTS} clients x {STEPS} steps in {seconds:.1f} s ({len(latencies) / seconds:.0f} steps/s), "
          f"latency p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms")
    assert len(latencies) == CLIENTS * STEPS and not any(c.duplicates for c in clients)
    job = stats.jobs[0]
    assert job.steps_applied == stats.steps_applied == CLIENTS * STEPS and stats.steps_duplicate == 0
    assert dict(job.client_last_step) == {f"c{i}": STEPS for i in range(CLIENTS)}
