"""Three hosts on one machine, deployed as docs/DEPLOY.md §3 deploys three machines.

Everything else runs on 127.0.0.1, where an address, a certificate, a token or Ray's own token
authentication that does not fit the deployment still works. Here each host is a network
namespace with its own interfaces and loopback, joined to the others by a bridge: the cloud
server listens on its host's address with TLS for that address and a token, a Ray head and a
Ray worker node run on two other hosts with Ray's token authentication on, and `split-ray
--address` on the head drives clients on both nodes, so every byte between the roles crosses
the bridge to another host's address, as between machines.

The commands are DEPLOY.md's, its example addresses replaced by the hosts' (a test that needs
no root checks that the document shows them), with test-only flags appended: per-node Ray temp
dirs (so no Ray instance of the machine is touched), one CPU a node, a small object store, and
the run's size. The hosts are built with the lines of DEPLOY.md's "try it on one machine"
recipe, under names with a random suffix so that two runs on one machine do not collide.

Needs root and iproute2's `ip`: skipped elsewhere, with the reason. The hosts come from
tests/netns.py, whose teardown runs whatever failed: it stops every process in the namespaces by
PID (`ip netns pids`: they are all this test's), then deletes the links, the namespaces and the
bridge. The host side of the bridge gets no address, so no route of the machine changes and
nothing outside can reach the hosts.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from deployment import (COMMANDS, DRIVER, GENERATE_TOKEN, HEAD_START, SERVER, SERVER_READY, SMALL_NODE, STATUS,
                        WORKER_START, active_nodes, make_pki)
from netns import BRIDGE_SETUP, HOST_SETUP, hosts_or_skip
from deploy.processes import start_command
from deploy.sim.cli import absolute_paths
from edge_client.config import ConnectionConfig, EdgeConfig
from splitnet.settings import DataSpec

ROOT = Path(__file__).resolve().parent.parent

# DEPLOY.md §3's commands (tests/deployment.py) with the document's example addresses, and its "try it on
# one machine" recipe (BRIDGE_SETUP, HOST_SETUP: tests/netns.py) as the document writes it
DOC_ADDRESSES = {"cloud": "10.0.0.5", "head": "10.0.0.10"}
DOC_RECIPE = {"bridge": "br-splt", "ns": "$ns", "veth": "$veth", "address": "$address"}
ADDRESSES = {"cloud": "10.77.0.2", "head": "10.77.0.3", "worker": "10.77.0.4"}

CLIENTS, MAX_STEPS = 4, 3


def deploy_md() -> str:
    """DEPLOY.md with its shell line continuations joined and its whitespace collapsed."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docs" / "DEPLOY.md").read_text())
    return re.sub(r"[ \t]+", " ", text)


def test_deploy_md_shows_the_commands_this_file_runs() -> None:
    """What the multi-host test proves holds for the document's commands only while they are the same:
    checked everywhere, root or not, so that an edit to either side fails at once."""
    text = deploy_md()
    missing = [c.format(**DOC_ADDRESSES) for c in COMMANDS if c.format(**DOC_ADDRESSES) not in text]
    missing += [line.format(**DOC_RECIPE) for line in BRIDGE_SETUP + HOST_SETUP
                if line.format(**DOC_RECIPE) not in text]
    assert not missing, "docs/DEPLOY.md lacks:\n" + "\n".join(missing)


def test_split_ray_hands_its_actors_absolute_paths(tmp_path, monkeypatch) -> None:
    """An actor on a cluster node opens files in the folder `ray start` ran in there, not the driver's:
    the multi-host test below starts its nodes in their homes and runs split-ray with `--tls-ca ca.pem`."""
    monkeypatch.chdir(tmp_path)
    edge = absolute_paths(EdgeConfig(connection=ConnectionConfig(tls_ca="ca.pem", tls_cert="/etc/edge.pem"),
                                     data=DataSpec("imagefolder", "data")))
    here = Path.cwd()
    assert (edge.connection.tls_ca, edge.connection.tls_cert, edge.connection.tls_key) == \
        (str(here / "ca.pem"), "/etc/edge.pem", "")
    assert edge.data.data_root == str(here / "data")


@pytest.fixture
def hosts(tmp_path):
    """cloud, head and worker (tests/netns.py); all of it gone afterwards."""
    with hosts_or_skip(ADDRESSES, tmp_path, prefix="splt") as made:
        yield made


@pytest.mark.slow
def test_split_ray_drives_clients_on_two_nodes_against_a_tls_server_on_a_third(hosts, tmp_path):
    cloud, head, worker = hosts["cloud"], hosts["head"], hosts["worker"]
    where = {"cloud": cloud.address, "head": head.address}
    work = tmp_path / "work"  # the certificates, at the same path on every host (one file system)
    work.mkdir()
    make_pki(work, cloud.address)
    token = secrets.token_hex(32)
    server = None
    try:
        server = start_command(cloud.command(SERVER.format(**where)), SERVER_READY,
                               timeout=120, env=cloud.env(SPLIT_AUTH_TOKEN=token), cwd=str(work))
        assert server.address == f"{cloud.address}:50051"

        head.run(GENERATE_TOKEN, cwd=work, timeout=60)
        # each node started in its home, not the driver's folder: the folder its actors run in
        head.run(HEAD_START.format(**where), *SMALL_NODE, "--temp-dir", str(head.ray_temp), cwd=head.home,
                 timeout=120)
        (worker.home / ".ray").mkdir()
        shutil.copy(head.home / ".ray" / "auth_token", worker.home / ".ray" / "auth_token")  # "copy the file"
        worker.run(WORKER_START.format(**where), *SMALL_NODE, "--temp-dir", str(worker.ray_temp), cwd=worker.home,
                   timeout=120)
        deadline = time.monotonic() + 60  # the autoscaler's view of the cluster lags the worker's start
        while active_nodes(status := worker.run(STATUS.format(**where), cwd=work, timeout=60)) < 2:
            assert time.monotonic() < deadline, f"ray status never listed both nodes:\n{status}"
            time.sleep(2)
        # Ray's token authentication is on: the same command with another token is turned away
        refused = subprocess.run(worker.command(STATUS.format(**where)), env=worker.env(RAY_AUTH_TOKEN="0" * 64),
                                 cwd=work, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stdout + refused.stderr

        report = tmp_path / "ray.json"
        out = head.run(DRIVER.format(**where), "--clients", str(CLIENTS), "--mode", "splitfed", "--epochs", "1",
                       "--max-steps", str(MAX_STEPS), "--report", str(report), cwd=work, timeout=300,
                       SPLIT_AUTH_TOKEN=token)
    finally:
        if server:  # the Ray processes are stopped with the rest of the namespaces' (fixture)
            server.stop(timeout=10)

    assert "serving TLS, 1 auth token(s)" in server.output(), server.output()
    summary = json.loads(report.read_text())
    rows = [json.loads(line) for line in report.with_suffix(".clients.jsonl").read_text().splitlines()]
    assert summary["clients_ok"] == CLIENTS and summary["failed"] == [], out
    assert [row["status"] for row in rows] == ["ok"] * CLIENTS
    # every client trained, and the server applied exactly the steps each one sent
    assert all(row["steps"] == MAX_STEPS == row["server_last_step"] for row in rows), rows
    assert summary["server_steps_applied"] == summary["client_steps_sent"] == CLIENTS * MAX_STEPS
    # the cluster was the two nodes, and the clients ran on both
    nodes = {node["node_id"]: node["node_ip"] for node in summary["ray_nodes"]}
    assert sorted(nodes.values()) == [head.address, worker.address]
    assert {(row["node_id"], row["node_ip"]) for row in rows} == set(nodes.items()), rows
