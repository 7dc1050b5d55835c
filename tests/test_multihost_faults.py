"""Faults on a real wire: a host's cable pulled in the middle of a round, and plugged back.

The hosts and the deployment are tests/test_multihost.py's (network namespaces on a bridge, a TLS
`cloud-server` with a token on one, a Ray head and a Ray worker node with Ray's token authentication
on two others, DEPLOY.md §3's commands), built once for the four runs here: `split-ray --address`
with one actor per client, and with virtual clients over `--workers` (one worker on each node),
each with its cable fault. A cable is pulled by taking the host's veth end on the bridge down
(tests/netns.py, `Host.cable`): its interface loses its carrier, nothing crosses, and addresses,
routes and connections stay, as when a switch port dies. It is pulled once round 1 is over and the
host's cable has carried MID_ROUND_BYTES more (a few steps' features: a round is under way), and
plugged back once the driver's output shows what the fault does. During its run the host sends at a
few Mbit/s (a tbf, SENDS_AT), so that a round lasts long enough to be caught in the middle.

- A worker host: Ray's head stops hearing the node's health checks and declares the node dead,
  which ends its actors. With one actor per client, the clients that ran there are marked failed
  and the others finish (docs/DEPLOY.md, Failures). With `--workers`, the turn that was running
  there runs again on the head's worker, from the client's state before the turn; the replacement
  worker cannot start anywhere (its node is gone, the head's CPU taken) and takes no turns
  (deploy/sim/virtual.py, `_Pool`). The run ends with its rounds.
- The cloud host, for longer than the reconnect window: every client waiting on a step gives up
  with an error that names the cloud's address, the seconds it waited (at least the window, at most
  the time the cable was out and a step) and the flag that sets the window. With `--workers`, a
  failed turn runs once more on the other worker, whose OpenSession waits the reconnect window too
  (the server has answered that worker before) before the client is marked failed (the error of
  that last try is the row's).

Each run is held to exactly-once: every step id of every client applied once (the server's count
of applied steps is the sum of the clients' last step ids) and none of a finished client lost (its
steps are the server's); a failed client may have had steps applied after the last count it
reported (`server_last_step` >= `steps`, docs/DEPLOY.md).

Timing, on a loaded 2-core machine: --deadline 8 and windows of 12 s (reconnect) and 8 s (connect)
are long for a step or an OpenSession here (tenths of a second) and short for a test; the head
declares a node dead after 4 health checks in a row go unanswered (one a second, 3 s each: at most
about 16 s), where Ray's defaults take about a minute; a raylet of a live node answers in
milliseconds, so 4 misses in a row take an outage, not load. Needs root and iproute2's `ip` and
`tc`: skipped elsewhere, with the reason.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from deployment import (DRIVER, GENERATE_TOKEN, HEAD_START, SERVER, SERVER_READY, SMALL_NODE, STATUS, WORKER_START,
                        active_node_ids, make_pki)
from netns import Host, hosts_or_skip, stop_processes
from deploy.processes import start_command

# The hosts tier (`make test-hosts`; `make test` leaves it out): minutes of one test worker.
pytestmark = pytest.mark.hosts

ADDRESSES = {"cloud": "10.77.1.2", "head": "10.77.1.3", "worker": "10.77.1.4"}
# test-only settings of the head's GCS (Ray reads RAY_<setting>): see the module's "Timing"
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                 "RAY_health_check_failure_threshold": "4"}
DEADLINE, RECONNECT, CONNECT = 8, 12, 8
CLIENTS, EPOCHS = 4, 3
# 4 clients of digits at batch 8: 45 steps a client a round (23 a turn of 8 virtual clients), 64 KiB of
# features a step; a few steps' worth means the round is under way, well before its end
RUN = ("--mode", "splitfed", "--epochs", str(EPOCHS), "--batch-size", "8", "--deadline", str(DEADLINE),
       "--reconnect-seconds", str(RECONNECT), "--connect-seconds", str(CONNECT))
VIRTUAL = ("--clients", "8", "--workers", "2", "--fraction", "0.5")
MID_ROUND_BYTES = 300_000
# Mbit/s a host sends at during a run of its test (tbf): a round then lasts at least its bytes through that
# host at that rate (a worker host's round: its turns' or its two clients' features, 1.5 to 5.8 MB; the
# cloud's: every step's gradient, 5.9 to 11.6 MB), so the rounds after round 1 outlast the time this
# process takes to see round 1's line on a loaded machine (on a quiet one a round took 1.3 s, and once
# the run ended before the cable was pulled)
SENDS_AT = {"worker": 4.0, "cloud": 16.0}
STARTUP = 300  # seconds for split-ray to start its actors and train round 1, on a loaded machine
FAILED = r"client \d+ \(\S+\) failed: "  # the driver's line for a client marked failed
RERUN = r"running it again on another worker"


class Cluster:
    """The three hosts, the cloud server and the two Ray nodes; `driver` runs split-ray on the head."""

    def __init__(self, hosts: dict[str, Host], work: Path) -> None:
        self.cloud, self.head, self.worker = hosts["cloud"], hosts["head"], hosts["worker"]
        self.where = {"cloud": self.cloud.address, "head": self.head.address}
        self.work, self.token = work, secrets.token_hex(32)
        self.server = None
        self.worker_starts = 0
        self.worker_lost = False  # a test unplugged the worker host: the head declared its node dead

    def start(self) -> None:
        make_pki(self.work, self.cloud.address)
        self.server = start_command(self.cloud.command(SERVER.format(**self.where)), SERVER_READY, timeout=120,
                                    env=self.cloud.env(SPLIT_AUTH_TOKEN=self.token), cwd=str(self.work))
        self.head.run(GENERATE_TOKEN, cwd=self.work, timeout=60)
        self.head.run(HEAD_START.format(**self.where), *SMALL_NODE, "--temp-dir", str(self.head.ray_temp),
                      cwd=self.head.home, timeout=120, **HEALTH_CHECKS)
        (self.worker.home / ".ray").mkdir()
        shutil.copy(self.head.home / ".ray" / "auth_token", self.worker.home / ".ray" / "auth_token")
        self.start_worker()

    def nodes(self) -> set[str]:
        return active_node_ids(self.head.run(STATUS.format(**self.where), cwd=self.work, timeout=60))

    def start_worker(self) -> None:
        """`ray start --address` on the worker host (a fresh temp dir each time), once the head lists it
        beside itself: a node it did not list before, since the autoscaler's view of the cluster lags
        (the worker's start, and a dead node's end: it can list a node declared dead for a while)."""
        before = self.nodes()
        self.worker_starts += 1
        temp = self.worker.ray_temp.with_name(f"worker-{self.worker_starts}")
        self.worker.run(WORKER_START.format(**self.where), *SMALL_NODE, "--temp-dir", str(temp),
                        cwd=self.worker.home, timeout=120)
        deadline = time.monotonic() + 60
        while not (len(now := self.nodes()) >= 2 and now - before):
            assert time.monotonic() < deadline, f"ray status never listed the new worker node beside {before}"
            time.sleep(2)

    def two_nodes(self) -> None:
        """Both nodes up: a worker node the head declared dead (a test unplugged it, or it is missing) is
        started again, as an operator would, its leftover processes (the raylet exits by itself on
        hearing it is dead) stopped first. Going by the head's list alone, a run once started while
        the head still listed the dead node, and every turn ran on the head: no fault to observe."""
        if self.worker_lost or len(self.nodes()) < 2:
            assert not stop_processes([self.worker.ns])
            self.start_worker()
            self.worker_lost = False

    def driver(self, name: str, *flags: str) -> "Driver":
        return Driver(self, name, *RUN, "--job", f"faults-{name}", *flags)


class Driver:
    """`split-ray --address` on the head, its output read as it comes."""

    def __init__(self, cluster: Cluster, name: str, *flags: str) -> None:
        self.report = cluster.work / f"{name}.json"
        command = cluster.head.command(DRIVER.format(**cluster.where), *flags, "--report", str(self.report))
        self.proc = subprocess.Popen(command, cwd=cluster.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=cluster.head.env(SPLIT_AUTH_TOKEN=cluster.token,
                                                                     PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.output())) < count:
            assert self.proc.poll() is None, f"split-ray ended before {pattern!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> tuple[int, dict, list[dict]]:
        """The exit status, the report and its rows, once split-ray has ended."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"split-ray did not end within {timeout} s:\n{self.output()}") from None
        self._reader.join(10)
        assert self.report.exists(), f"split-ray exited {code} without a report:\n{self.output()}"
        rows = [json.loads(line) for line in self.report.with_suffix(".clients.jsonl").read_text().splitlines()]
        return code, json.loads(self.report.read_text()), rows


@contextmanager
def sending_at(host: Host, mbps: float) -> Iterator[None]:
    """The host's outgoing traffic held to `mbps` by a tbf on its eth0 (a bucket of 100 ms of the rate)."""
    host.tc(f"qdisc replace dev eth0 root tbf rate {int(mbps * 1e6)}bit burst {int(mbps * 1e6 / 8 / 10)} "
            "limit 262144")
    try:
        yield
    finally:
        host.tc("qdisc del dev eth0 root")


def pull_cable(driver: Driver, host: Host, until: str, count: int = 1, timeout: float = 180) -> float:
    """Once round 1 is over and the host's cable has carried MID_ROUND_BYTES more, unplug it; plug it back
    once the driver's output has `count` lines matching `until`. The seconds it was out."""
    driver.wait_for(rf"round 1/{EPOCHS} \(", STARTUP)
    start, deadline = host.traffic(), time.monotonic() + 60
    while host.traffic() - start < MID_ROUND_BYTES:
        assert driver.proc.poll() is None and time.monotonic() < deadline, \
            f"the run ended, or no round went on, before {MID_ROUND_BYTES} bytes crossed {host.ns}'s cable " \
            f"after round 1:\n{driver.output()}"
        time.sleep(0.02)
    host.cable(False)
    pulled = time.monotonic()
    try:
        driver.wait_for(until, timeout, count)
    finally:
        host.cable(True)
    return time.monotonic() - pulled


def assert_each_step_once(report: dict, rows: list[dict]) -> None:
    """Every client's step ids applied once, and none lost of a client that finished."""
    assert report["server_steps_applied"] == sum(r["server_last_step"] for r in rows), (report, rows)
    for r in rows:
        if r["status"] == "ok":
            assert (r["steps"] or 0) == r["server_last_step"], r  # a client never sampled has sent none
        else:
            assert r["server_last_step"] >= (r["steps"] or 0) and r["error"], r
    if report["clients_ok"]:  # the run went on to its end (with no client left, it stops)
        assert len(report["rounds"]) == EPOCHS, report["rounds"]


def assert_names_the_cloud_and_the_wait(row: dict, cloud: str, out: float) -> None:
    """The error names the cloud's address and the seconds waited: at least the window its flag sets, and
    at most the time the cable was out plus a step's reply time (the wait counts from the step's send,
    which may precede the pull by up to --deadline), rounded."""
    found = re.search(rf"{re.escape(cloud)}\b.*\b(?:for|after) (\d+) s\b.*\(--(re)?connect-seconds (\d+)\)",
                      row["error"] or "")
    assert found, row
    waited, window = int(found.group(1)), int(found.group(3))
    assert window == (RECONNECT if found.group(2) else CONNECT), row
    assert window <= waited <= out + DEADLINE + 1, (row, out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    homes = tmp_path_factory.mktemp("faults")
    work = homes / "work"  # the certificates, at the same path on every host (one file system)
    work.mkdir()
    tc = "" if shutil.which("tc") else "iproute2's `tc` is not installed"
    with hosts_or_skip(ADDRESSES, homes, prefix="splt", reason=tc) as hosts:
        made = Cluster(hosts, work)
        try:
            made.start()
            yield made
        finally:  # the Ray processes are stopped with the rest of the namespaces' (network())
            if made.server:
                made.server.stop(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("virtual", [False, True], ids=["actors", "workers"])
def test_the_cloud_unplugged_past_the_reconnect_window_fails_the_clients_naming_it(cluster, virtual):
    cluster.two_nodes()
    with sending_at(cluster.cloud, SENDS_AT["cloud"]):
        driver = cluster.driver(f"cloud-{'workers' if virtual else 'actors'}",
                                *(VIRTUAL if virtual else ("--clients", str(CLIENTS))))
        # one actor per client: all of them fail (each was waiting on a step); with --workers, the first
        # client marked failed (its turn and its turn's second try) is enough
        out = pull_cable(driver, cluster.cloud, FAILED, count=1 if virtual else CLIENTS)
        code, report, rows = driver.finish()
    failed = [r for r in rows if r["status"] == "failed"]
    assert code == 1 and failed and report["failed"] == [r["client_id"] for r in failed], driver.output()
    if not virtual:
        assert len(failed) == CLIENTS
    for row in failed:
        assert_names_the_cloud_and_the_wait(row, f"{cluster.cloud.address}:50051", out)
    assert_each_step_once(report, rows)


@pytest.mark.slow
def test_a_worker_host_unplugged_mid_round_marks_its_clients_failed_and_the_others_finish(cluster):
    cluster.two_nodes()
    cluster.worker_lost = True  # whatever happens below
    with sending_at(cluster.worker, SENDS_AT["worker"]):
        driver = cluster.driver("worker-actors", "--clients", str(CLIENTS))
        pull_cable(driver, cluster.worker, FAILED)
        code, report, rows = driver.finish()
    there = [r for r in rows if r["node_ip"] == cluster.worker.address]
    assert 0 < len(there) < CLIENTS, rows  # SPREAD put clients on both nodes
    # the clients of the unplugged host, and only they, failed: their actors died with their node
    assert code == 1 and report["failed"] == [r["client_id"] for r in there], driver.output()
    assert all("ActorDiedError" in r["error"] and "node" in r["error"] for r in there), there
    assert report["clients_ok"] == CLIENTS - len(there)
    assert_each_step_once(report, rows)


@pytest.mark.slow
def test_a_worker_host_unplugged_mid_turn_has_the_turn_run_again_on_the_other_node(cluster):
    cluster.two_nodes()
    cluster.worker_lost = True  # whatever happens below
    with sending_at(cluster.worker, SENDS_AT["worker"]):
        driver = cluster.driver("worker-workers", *VIRTUAL)
        pull_cable(driver, cluster.worker, RERUN)
        code, report, rows = driver.finish()
    assert report["retries"] >= 1 and report["workers_replaced"] >= 1, driver.output()
    again = [r for r in rows if r["retries"]]
    # a turn run again ended on the head (the only node left), or the client is marked failed with why
    assert again and all(r["node_ip"] == cluster.head.address if r["status"] == "ok" else r["error"]
                         for r in again), again
    assert code == (1 if report["failed"] else 0)
    assert report["clients_ok"] + len(report["failed"]) == 8
    assert_each_step_once(report, rows)
