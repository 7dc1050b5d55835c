"""Hosts on one machine: network namespaces joined by a bridge, built with the lines of
docs/DEPLOY.md's "try it on one machine" recipe. Shared by the tests that need separate hosts
(test_multihost, test_multihost_link) and by benchmarks/link_vs_tbf.py.

Each host is a namespace with its own interfaces, loopback and address, and a veth pair whose
other end is on the bridge. `network()` builds them under names with a random suffix, so that
two runs on one machine do not collide, and tears everything down afterwards whatever failed:
it stops every process in the namespaces by PID (`ip netns pids`: they are all the caller's),
then deletes the links, the namespaces and the bridge. The host side of the bridge gets no
address, so no route of the machine changes and nothing outside can reach the hosts.

Needs root and iproute2's `ip` (`can_make_namespaces` says why not).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # the entry points (ray, cloud-server, split-ray, split-link) of this environment

# DEPLOY.md §3's Ray environment: every host's commands run with it
RAY_ENV = "export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token"

# DEPLOY.md's "try it on one machine" recipe: the bridge, then per host its namespace, its veth pair
# (the host's end named eth0), its address and loopback
BRIDGE_SETUP = ("ip link add {bridge} type bridge", "ip link set {bridge} up")
HOST_SETUP = ("ip netns add {ns}", "ip link add {veth} type veth peer name eth0 netns {ns}",
              "ip link set {veth} master {bridge} up", "ip -n {ns} addr add {address}/24 dev eth0",
              "ip -n {ns} link set eth0 up", "ip -n {ns} link set lo up")

IP_TIMEOUT = 10  # seconds for one `ip` command
# seconds the namespaces' processes get after SIGTERM, before SIGKILL: Ray's gcs_server, raylet, monitor
# and runtime-env agent were still there 12 s after a SIGTERM, so waiting longer only adds to the teardown
STOP_GRACE = 3


class NotPermitted(RuntimeError):
    """The machine does not let this process build the hosts (no CAP_NET_ADMIN, say): a reason to skip."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=check)


@dataclass
class Host:
    """One namespace: a machine of the deployment, with its own address and home directory
    (where Ray keeps its token file, ~/.ray/auth_token)."""

    ns: str
    veth: str  # the end of its veth pair on the bridge: its cable
    address: str
    home: Path
    ray_temp: Path  # its Ray node's --temp-dir

    def command(self, line: str, *extra: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *shlex.split(line), *extra]

    def env(self, **extra: str) -> dict[str, str]:
        """This environment with the venv's commands first on PATH, this host's HOME and RAY_ENV's
        variables, and no other Ray variable: those of this process are not the hosts' (conftest.py
        imports tests/ray_cluster.py, which sets a one-machine Ray's for the worker's own cluster, and
        that refuses `ray start --address`)."""
        ray_vars = dict(pair.split("=", 1) for pair in RAY_ENV.split()[1:])
        own = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**own, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(self.home), **ray_vars, **extra}

    def run(self, line: str, *extra: str, cwd: Path, timeout: float, **env: str) -> str:
        """Run a command on this host to its end; its output, or a failure that shows it."""
        done = subprocess.run(self.command(line, *extra), cwd=cwd, env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{line} on {self.ns}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def tc(self, line: str) -> None:
        """`tc LINE` in this host (its eth0 is the device the line names)."""
        done = subprocess.run(["ip", "netns", "exec", self.ns, "tc", *shlex.split(line)], capture_output=True,
                              text=True, timeout=IP_TIMEOUT)
        assert done.returncode == 0, f"tc {line} on {self.ns}: {done.stderr}"

    def traffic(self) -> int:
        """Bytes that have crossed this host's cable, either way (the counters of its veth end on the bridge,
        read from this process's own namespace)."""
        stats = Path("/sys/class/net") / self.veth / "statistics"
        return sum(int((stats / name).read_text()) for name in ("rx_bytes", "tx_bytes"))

    def cable(self, up: bool) -> None:
        """Unplug (or plug back) this host's cable: its veth end on the bridge goes down (up), so its eth0
        loses its carrier and nothing crosses until it comes back; addresses and routes stay."""
        ip("link", "set", self.veth, "up" if up else "down")


def stop_processes(namespaces: list[str]) -> list[str]:
    """SIGTERM to every process in the namespaces, SIGKILL to what is left after STOP_GRACE seconds;
    the PIDs still there at the end."""

    def pids() -> list[int]:
        found = []
        for ns in namespaces:
            listed = ip("netns", "pids", ns, check=False)
            found += [int(pid) for pid in listed.stdout.split()] if listed.returncode == 0 else []
        return found

    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)
    return [str(pid) for pid in pids()]


def can_make_namespaces() -> str:
    """Why this machine cannot run the hosts ('' if it can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not shutil.which("ip"):
        return "iproute2's `ip` is not installed"
    return ""


@contextmanager
def hosts_or_skip(addresses: dict[str, str], homes: Path, prefix: str, reason: str = "") -> Iterator[dict[str, Host]]:
    """`network()` for a test fixture: the test is skipped, saying why, where the hosts cannot be made
    (`reason`: a further one the caller has, '' for none)."""
    import pytest

    reason = can_make_namespaces() or reason
    if reason:
        pytest.skip(reason)
    try:
        with network(addresses, homes, prefix=prefix) as made:
            yield made
    except NotPermitted as err:
        pytest.skip(str(err))


def build(line: str) -> None:
    """One `ip` line of the hosts' set-up: NotPermitted where the machine does not permit it (in a
    container without CAP_NET_ADMIN or CAP_SYS_ADMIN, say), a failure for any other error."""
    done = ip(*shlex.split(line)[1:], check=False)
    if done.returncode and "Operation not permitted" in done.stderr:
        raise NotPermitted(f"cannot build the hosts here: {line}: {done.stderr.strip()}")
    assert done.returncode == 0, f"{line}: {done.stderr}"


@contextmanager
def network(addresses: dict[str, str], homes: Path, prefix: str = "splt") -> Iterator[dict[str, Host]]:
    """A host per name of `addresses` (name -> its address on a /24), with its home in `homes`, on a
    bridge of their own, and a short folder for their Ray temp dirs; all of it gone afterwards."""
    suffix = secrets.token_hex(2)
    bridge = f"br-{prefix}-{suffix}"
    ray_temp = Path(tempfile.mkdtemp(prefix="rmh-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    made = {name: Host(f"{prefix}-{suffix}-{name}", f"v{suffix}-{name}", address, homes / f"home-{name}",
                       ray_temp / name) for name, address in addresses.items()}
    try:
        for line in BRIDGE_SETUP:
            build(line.format(bridge=bridge))
        for host in made.values():
            host.home.mkdir(parents=True)
            fields = {"bridge": bridge, "ns": host.ns, "veth": host.veth, "address": host.address}
            for line in HOST_SETUP:
                build(line.format(**fields))
        yield made
    finally:
        # each step fails harmlessly on what was never made
        left = stop_processes([host.ns for host in made.values()])
        for host in made.values():
            ip("link", "del", host.veth, check=False)  # with its peer: the namespace keeps no link
            ip("netns", "del", host.ns, check=False)
        ip("link", "del", bridge, check=False)
        shutil.rmtree(ray_temp, ignore_errors=True)
        leftovers = [f"processes {left}"] if left else []
        listed = ip("-br", "link", check=False).stdout + ip("netns", "list", check=False).stdout
        leftovers += [line for line in listed.splitlines() if suffix in line]
        assert not leftovers, f"teardown left {leftovers}"
