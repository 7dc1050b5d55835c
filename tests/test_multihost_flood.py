"""Fairness between hosts: one host floods the cloud server with idle streams, another host's client
trains through it as if alone.

tests/test_load.py floods a server on loopback, where every client is 127.0.0.1 and only a token
can tell two peers apart. Here the peers are separate hosts (network namespaces on a bridge,
tests/netns.py): the cloud server listens on its host's address with TLS for that address and one
token, which the flooding host and the honest host both present, so that only their addresses
make them two peers (`cloud_server.streams.peer_key`: host and credential, not the connection).

The flooding host runs tests/flood_streams.py: it opens 256 idle `Train` streams over 16
connections (each channel its own TCP connection, counted on the cloud host with `ss`) and sends
nothing on them. The server keeps its per-peer share (--max-streams-per-peer, 16) of them open and
refuses every other at once with RESOURCE_EXHAUSTED. Meanwhile an edge-client on a third host
trains a short digits run to its end, with the same steps and the same test accuracy as the same
run alone (on CPU a run is deterministic; the alone run goes first, against the same server, in a
job of its own), and the server's health stays SERVING, asked from the honest host and from the
flooding one.

The same again over IPv6 (the hosts given fd78:: addresses as well, the server bound to its own):
gRPC names an IPv6 peer percent-encoded (`ipv6:%5Bfd78::3%5D:PORT`), which `peer_key` once read as the
host '' for every IPv6 peer, so that the honest host, with the same token, was the flooder's peer and
was refused (RESOURCE_EXHAUSTED, "this peer ... already holds 16"); and `cloud-server --host fd78::2`
did not start at all (its port probe opened an IPv4 socket). Each case takes about 30 s.

Needs root and iproute2's `ip`: skipped elsewhere, with the reason. The teardown is tests/netns.py's:
every process in the namespaces stopped by PID, then the links, the namespaces and the bridge.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_server.config import ServerConfig
from deploy.processes import start_command
from deployment import SERVER, SERVER_READY, make_pki
from netns import hosts_or_skip

# The hosts tier (`make test-hosts`; `make test` leaves it out): minutes of one test worker.
pytestmark = pytest.mark.hosts

HERE = Path(__file__).resolve().parent
ADDRESSES = {"cloud": "10.78.0.2", "flood": "10.78.0.3", "edge": "10.78.0.4"}
IPV6 = {"cloud": "fd78::2", "flood": "fd78::3", "edge": "fd78::4"}  # added to the same hosts for the IPv6 case
STREAMS, CONNECTIONS = 256, 16
SHARE = ServerConfig.max_streams_per_peer
STEPS = 30
# a short digits run (one torch thread, both CLIs' default: the same arithmetic in both runs)
EDGE = ("edge-client --server {server} --tls-ca ca.pem --dataset digits --client-id honest --seed 0 "
        f"--batch-size 32 --max-steps {STEPS} --epochs 1 --no-progress")


@pytest.fixture
def hosts(tmp_path):
    """cloud, flood and edge (tests/netns.py); all of it gone afterwards."""
    with hosts_or_skip(ADDRESSES, tmp_path, prefix="mhfl") as made:
        yield made


def flooder(host, server: str, token: str, *extra: str) -> list[str]:
    return host.command(f"{sys.executable} {HERE / 'flood_streams.py'} --server {server} "
                        f"--tls-ca ca.pem --auth-token {token}", *extra)


def connections_from(cloud, address: str) -> int:
    """Established TCP connections from `address` to the server's port, as the cloud host sees them (the
    server's socket is dual-stack: `ss` shows an IPv4 peer as [::ffff:ADDRESS])."""
    listed = subprocess.run(cloud.command("ss -Htn state established"), capture_output=True, text=True, timeout=10,
                            check=True).stdout

    def host(endpoint: str) -> str:
        return endpoint.rpartition(":")[0].strip("[]").removeprefix("::ffff:")

    return sum(1 for line in listed.splitlines()
               if len(fields := line.split()) >= 4 and fields[-2].endswith(":50051") and host(fields[-1]) == address)


def train(edge, server: str, work: Path, job: str, token: str) -> dict:
    report = work / f"{job}.json"
    edge.run(EDGE.format(server=server), "--job", job, "--report", str(report), cwd=work, timeout=120,
             SPLIT_AUTH_TOKEN=token)
    return json.loads(report.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_flooding_host_gets_its_share_and_another_hosts_client_trains_as_if_alone(hosts, tmp_path, family):
    cloud, flood, edge = hosts["cloud"], hosts["flood"], hosts["edge"]
    if family == "ipv6":  # gRPC names an IPv6 peer percent-encoded (ipv6:%5Bfd78::3%5D:PORT)
        for name, host in hosts.items():
            subprocess.run(host.command(f"ip addr add {IPV6[name]}/64 dev eth0 nodad"), check=True, timeout=10)
    address = {name: IPV6[name] if family == "ipv6" else host.address for name, host in hosts.items()}
    server_at = f"[{address['cloud']}]:50051" if family == "ipv6" else f"{address['cloud']}:50051"
    work = tmp_path / "work"  # the certificates, at the same path on every host (one file system)
    work.mkdir()
    make_pki(work, address["cloud"])
    token = secrets.token_hex(32)  # one token for both hosts: only their addresses tell them apart
    server = flooding = None
    try:
        server = start_command(cloud.command(SERVER.format(cloud=address["cloud"]), "--idle-timeout", "120"),
                               SERVER_READY, timeout=120, env=cloud.env(SPLIT_AUTH_TOKEN=token), cwd=str(work))
        alone = train(edge, server_at, work, "alone", token)

        flooding = subprocess.Popen(flooder(flood, server_at, token, "--streams", str(STREAMS), "--connections",
                                            str(CONNECTIONS), "--share", str(SHARE)),
                                    cwd=work, env=flood.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        settled = json.loads(flooding.stdout.readline() or "null")
        assert settled, flooding.stderr.read()
        flood_connections = connections_from(cloud, address["flood"])

        beside = train(edge, server_at, work, "beside-the-flood", token)
        health = {host.ns: subprocess.run(flooder(host, server_at, token, "--health"), cwd=work, env=host.env(),
                                          capture_output=True, text=True, timeout=60).stdout.strip()
                  for host in (edge, flood)}
        out, err = flooding.communicate("", timeout=60)
        held = json.loads(out.splitlines()[0])
    finally:
        if flooding and flooding.poll() is None:
            flooding.kill()
            flooding.wait(10)
        if server:
            server.stop(timeout=10)

    print(f"\n{family} flood: {settled['streams']} streams over {flood_connections} connections, "
          f"{settled['ended']} refused {settled['codes']}, {held['still_open']} held; "
          f"alone {alone['steps']} steps acc {alone['test_accuracy']:.4f}, beside the flood "
          f"{beside['steps']} steps acc {beside['test_accuracy']:.4f}")
    # the flood was hundreds of streams over many connections, each its own TCP connection
    assert settled["streams"] == STREAMS and flood_connections == CONNECTIONS == held["connections"]
    # it got its share and no more: every other stream refused at once, naming the per-peer limit
    assert settled["codes"] == {"RESOURCE_EXHAUSTED": STREAMS - SHARE}, settled
    assert "--max-streams-per-peer" in settled["details"]["RESOURCE_EXHAUSTED"], settled
    assert held["still_open"] == SHARE, held
    # the other host's client trained to the end as if alone
    assert alone["steps"] == beside["steps"] == alone["last_step_id"] == beside["last_step_id"] == STEPS
    assert beside["test_accuracy"] == alone["test_accuracy"], (alone, beside)
    assert beside["reconnects"] == 0 and beside["duplicate_steps"] == 0
    assert set(health.values()) == {"SERVING"}, health
    assert "serving TLS, 1 auth token(s)" in server.output(), server.output()
