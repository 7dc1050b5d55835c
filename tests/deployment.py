"""docs/DEPLOY.md §3 as the multi-host tests run it: its commands, a PKI for the cloud host's address
and what `ray status` lists. Shared by tests/test_multihost.py (which checks that the document shows
these commands) and tests/test_multihost_faults.py; the hosts themselves are tests/netns.py's."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import make_cert, write_cert
from netns import RAY_ENV

# DEPLOY.md §3's commands; {cloud} and {head} are the cloud server's and the Ray head's addresses
GENERATE_TOKEN = "ray get-auth-token --generate"
HEAD_START = "ray start --head --port 6379 --node-ip-address {head} --include-dashboard=false"
WORKER_START = "ray start --address {head}:6379"
STATUS = "ray status --address {head}:6379"
SERVER = "cloud-server --host {cloud} --port 50051 --tls-cert server.pem --tls-key server.key"
DRIVER = "split-ray --address {head}:6379 --server {cloud}:50051 --tls-ca ca.pem"
COMMANDS = (RAY_ENV, GENERATE_TOKEN, HEAD_START, WORKER_START, STATUS, SERVER, DRIVER)
SERVER_READY = r"cloud-server listening on (\S+:\d+)"
# test-only flags of each Ray node: one CPU, a small object store (the per-node --temp-dir is added too)
SMALL_NODE = ("--num-cpus", "1", "--object-store-memory", str(100 * 2**20))


def make_pki(folder: Path, server_ip: str) -> None:
    """ca.pem, and server.pem / server.key for `server_ip` (an IP subject alternative name)."""
    ca_cert, ca_key = make_cert("split-ca", None, "split-ca", ca=True)
    write_cert(folder, "ca", ca_cert, ca_key)
    sans = [x509.IPAddress(ipaddress.ip_address(server_ip))]
    write_cert(folder, "server", *make_cert("cloud", ca_key, "split-ca", sans=sans,
                                            usage=ExtendedKeyUsageOID.SERVER_AUTH))


def active_node_ids(status: str) -> set[str]:
    """The ids of the nodes `ray status` lists under Active."""
    section = re.search(r"Active:\n((?:[ \t]+\d+ node_\w+\n)*)", status)
    return set(re.findall(r"node_\w+", section.group(1))) if section else set()


def active_nodes(status: str) -> int:
    """How many nodes `ray status` lists under Active."""
    return len(active_node_ids(status))
