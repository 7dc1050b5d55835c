"""Load: 8 concurrent clients x 200 steps against one server process on loopback.

Every update must be applied exactly once (the server's Stats agree with what the
clients got back) and the p99 step latency is printed (`pytest -s` shows it). One peer
that floods the server with idle streams gets only its share of them."""

import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.soak import LoadClient
from cloud_server.config import ServerConfig
from cloud_server.streams import peer_key
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.report import percentile
from edge_client.trainer import run
from deploy.processes import start_server
from splitnet import security
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


@pytest.mark.slow
def test_one_peer_flooding_streams_over_many_connections_gets_only_its_share(tmp_path):
    """The issue's flood: one peer opens 64 idle Train streams over 4 connections. It holds its
    --max-streams-per-peer (16) of them, over all its connections, and is refused the rest at once
    naming that flag; health stays SERVING, Stats answers, and a client of another peer (another
    token: on loopback every client shares 127.0.0.1) trains all its steps meanwhile."""
    flood_token, honest_token = "flooder-" + "f" * 24, "honest-" + "h" * 24
    server = start_server("--auth-token", flood_token, "--auth-token", honest_token, "--idle-timeout", "60")
    gates = [queue.Queue() for _ in range(64)]
    # own connections, as other processes would have (gRPC otherwise shares one per target)
    channels = [security.open_channel(server.address, [("grpc.use_local_subchannel_pool", 1)], auth_token=flood_token)
                for _ in range(4)]
    try:
        stubs = [split_pb2_grpc.SplitLearningStub(channel) for channel in channels]
        calls = [stubs[i % 4].Train(iter(gate.get, None), timeout=90) for i, gate in enumerate(gates)]
        # Which calls are refused depends on the order they reach the server: count the ended ones.
        share, waited = ServerConfig.max_streams_per_peer, time.monotonic() + 30
        while sum(call.done() for call in calls) < len(calls) - share and time.monotonic() < waited:
            time.sleep(0.05)
        time.sleep(0.2)  # one more refusal than it should would show up now
        refused = [call for call in calls if call.done()]
        assert len(refused) == len(calls) - share, [call.details() for call in refused]
        assert {call.code() for call in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("--max-streams-per-peer" in call.details() for call in refused), refused[0].details()

        config = EdgeConfig(connection=ConnectionConfig(server=server.address, deadline_s=20, auth_token=honest_token),
                            job="beside-the-flood", client_id="honest", epochs=1, max_steps=3, progress=False)
        result = run(config, RemoteCloud(config.connection))
        with security.open_channel(server.address, [], auth_token=honest_token) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            stats = split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(job="beside-the-flood"), timeout=10)
        assert sum(not call.done() for call in calls) == share  # the flood still holds its share
    finally:
        for gate in gates:
            gate.put(None)
        for channel in channels:
            channel.close()
        server.stop()
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert result["steps"] == result["last_step_id"] == 3
    assert stats.jobs[0].steps_applied == 3 and dict(stats.jobs[0].client_last_step) == {"honest": 3}


def test_a_peer_is_its_host_and_credential_not_its_connection():
    assert peer_key("ipv4:10.0.0.7:41234", "") == peer_key("ipv4:10.0.0.7:41299", "") == "10.0.0.7"
    assert peer_key("ipv6:[::1]:5000", "token:ab12") == peer_key("ipv6:[::1]:6000", "token:ab12") == "::1 token:ab12"
    assert peer_key("ipv4:10.0.0.7:1", "token:ab12") != peer_key("ipv4:10.0.0.7:1", "token:cd34")
    # as gRPC writes an IPv6 peer (percent-encoded): each host its own key, not one ('') for all of them
    assert peer_key("ipv6:%5B::1%5D:37184", "") == peer_key("ipv6:[::1]:5000", "") == "::1"
    assert peer_key("ipv6:%5Bfd00::3%5D:4000", "") == "fd00::3" != peer_key("ipv6:%5Bfd00::4%5D:4000", "")
