"""Many virtual clients on one machine: memory and speed for N = 10, 100, 1000 over W = 2 workers.

Runs `split-ray --start-server --workers W` on digits once per N, and once a 3-client run with
one actor per client (the baseline), each in a process of its own, and samples every
process of the run from /proc every `--interval` seconds: split-ray itself (the Ray driver),
the cloud-server it starts, Ray's own processes (GCS, raylet, agents, idle workers) and the
worker actors. Prints one JSON object; per run:

    peak_rss_mb / peak_pss_mb     the largest sum over the run's processes of their resident memory
                                  (RSS counts the pages processes share, torch's libraries, once
                                  in each; PSS splits them), the processes counted then, and the
                                  RSS of each at that moment by kind (ray::Worker, raylet, ...)
    peak_rss_over_baseline        peak_rss_mb / the baseline's
    samples_per_second            trained by all clients over the rounds' wall time (the report's)
    seconds_per_round             each round's wall time, and their mean
    server_steps_applied, client_steps_sent, test_accuracy, state_bytes_mean   from its report

    python benchmarks/scale.py                                   # splitfed, --fraction 0.1, 3 rounds
    python benchmarks/scale.py --clients 100 --mode parallel --fraction 0.2 --rounds 10

`--hosts`: the same over two Ray nodes, as docs/DEPLOY.md section 3 deploys them. Three hosts on
this machine (network namespaces on a bridge, tests/netns.py: needs root): the cloud-server on
one, with TLS for its address and a token; a Ray head and a Ray worker node on the others, with
Ray's token authentication, one CPU each (tests/deployment.py's commands, DEPLOY.md's). On that
one cluster it runs the baseline (`--baseline` clients, one actor each) and then each N
(`split-ray --address HEAD:6379 --server CLOUD:50051 --tls-ca ca.pem --workers W`, on the head;
W = 2 puts one worker on each node), and samples the memory of every process of the three hosts
(those whose network namespace is one of theirs: split-ray, the cloud-server, both nodes' Ray
processes and the workers). Each run's entry adds the nodes its clients ran on. The cloud-server
serves both runs. 10,000 clients need a training set of 10,000 samples or more (digits has 1,437;
CIFAR10_TREE: CIFAR-10 as an ImageFolder tree, train/<class> and test/<class>):

    sudo .venv/bin/python benchmarks/scale.py --hosts --clients 10000 --fraction 0.01 \\
        --dataset imagefolder --data-root CIFAR10_TREE --baseline-max-steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the hosts: tests/netns.py

from deploy.processes import ServerProcess, descendants, start_command  # noqa: E402


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) if it is gone."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        pss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                   if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0, 0
    return rss, pss


def _name(pid: int) -> str:
    """What a process is: a Ray worker's title (`ray::Worker`, `ray::IDLE`), a `python -m` module, a program."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if Path(argv[0]).name.startswith("python") and len(argv) > 1 and not argv[1].startswith("-"):
        return Path(argv[1]).name  # a script: split-ray, cloud-server, Ray's monitor.py
    return Path(argv[0]).name


def in_namespaces(inodes: set[int]) -> set[int]:
    """Every process whose network namespace is one of `inodes` (the hosts' `/run/netns/NAME`)."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            if entry.stat().st_ino in inodes:
                found.add(int(entry.parent.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


class TreeMemory:
    """The peak, over samples, of the memory summed over a process and everything below it (or over
    what `processes()` lists), and the resident memory of each kind of process at that peak."""

    def __init__(self, pid: int, interval: float, processes: Callable[[], set[int]] | None = None) -> None:
        self.pid, self.interval = pid, interval
        self.processes_now = processes or (lambda: {self.pid} | descendants(self.pid))
        self.peak_rss = self.peak_pss = self.processes = 0
        self.by_process: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            pids = self.processes_now()
            sizes = {p: _memory_kb(p) for p in pids}
            rss, pss = (sum(s[i] for s in sizes.values()) for i in (0, 1))
            if rss > self.peak_rss:
                self.peak_rss, self.processes = rss, len(pids)
                self.by_process = {}
                for p, (kb, _) in sorted(sizes.items()):
                    self.by_process.setdefault(_name(p), []).append(round(kb / 1024))
            self.peak_pss = max(self.peak_pss, pss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def data_args(args: argparse.Namespace) -> list[str]:
    return ["--dataset", args.dataset] + (["--data-root", str(Path(args.data_root).resolve())] if args.data_root else [])


def run_args(clients: int, args: argparse.Namespace, virtual: bool) -> list[str]:
    """split-ray's flags for one run: the baseline's (one actor per client) or N virtual clients'."""
    flags = ["--clients", str(clients), "--mode", args.mode, "--epochs", str(args.rounds), "--no-progress",
             *data_args(args)]
    if virtual:
        return flags + ["--workers", str(args.workers), "--fraction", str(args.fraction), "--local-steps",
                        str(args.local_steps)]
    return flags + (["--max-steps", str(args.baseline_max_steps)] if args.baseline_max_steps else [])


def entry(clients: int, virtual: bool, report: dict, memory: TreeMemory) -> dict:
    """One run's line of the output: its peak memory, speed and steps, from its report and the samples."""
    seconds = [r["seconds"] for r in report["rounds"]]
    return {"clients": clients, "engine": f"{report['workers']} workers" if virtual else "one actor per client",
            "participants_per_round": report["rounds"][0].get("participants", clients),
            "peak_rss_mb": memory.peak_rss / 1024, "peak_pss_mb": memory.peak_pss / 1024,
            "processes_at_peak": memory.processes, "rss_mb_at_peak_by_process": memory.by_process,
            "samples_per_second": report["samples_per_second"],
            "seconds_per_round": seconds, "seconds_per_round_mean": statistics.mean(seconds),
            "wall_seconds": report["wall_seconds"], "server_steps_applied": report["server_steps_applied"],
            "client_steps_sent": report["client_steps_sent"], "test_accuracy": report["test_accuracy"],
            "state_bytes_mean": report.get("state_bytes_mean"), "failed": len(report["failed"])}


def measure(clients: int, args: argparse.Namespace, virtual: bool) -> dict:
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        command = [sys.executable, "-m", "deploy.sim.cli", "--start-server", *run_args(clients, args, virtual),
                   "--report", f"{temp}/ray.json"]
        env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        memory = TreeMemory(proc.pid, args.interval)
        _, err = proc.communicate(timeout=args.timeout)
        memory.stop()
        if proc.returncode:
            raise RuntimeError(f"split-ray --clients {clients} exited {proc.returncode}: {err[-3000:]}")
        report = json.loads(Path(f"{temp}/ray.json").read_text())
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return entry(clients, virtual, report, memory)


# --hosts: three hosts on a /24 of their own (tests/test_multihost.py uses 10.77, link_vs_tbf 10.78)
HOST_ADDRESSES = {"cloud": "10.79.0.2", "head": "10.79.0.3", "worker": "10.79.0.4"}


class Cluster:
    """The cloud-server, the Ray head and the Ray worker node on their hosts, started with DEPLOY.md
    section 3's commands (tests/deployment.py); `measure` runs split-ray on the head."""

    def __init__(self, hosts: dict, work: Path, args: argparse.Namespace) -> None:
        from deployment import (GENERATE_TOKEN, HEAD_START, SERVER, SERVER_READY, SMALL_NODE, STATUS, WORKER_START,
                                active_nodes, make_pki)

        self.cloud, self.head, self.worker = hosts["cloud"], hosts["head"], hosts["worker"]
        self.where = {"cloud": self.cloud.address, "head": self.head.address}
        self.work, self.args = work, args
        self.inodes = {Path(f"/run/netns/{h.ns}").stat().st_ino for h in hosts.values()}
        make_pki(work, self.cloud.address)
        self.token = os.urandom(32).hex()
        self.server: ServerProcess | None = start_command(
            self.cloud.command(SERVER.format(**self.where)), SERVER_READY, timeout=120,
            env=self.cloud.env(SPLIT_AUTH_TOKEN=self.token), cwd=str(work))
        self.head.run(GENERATE_TOKEN, cwd=work, timeout=60)
        self.head.run(HEAD_START.format(**self.where), *SMALL_NODE, "--temp-dir", str(self.head.ray_temp),
                      cwd=self.head.home, timeout=180)
        (self.worker.home / ".ray").mkdir()
        shutil.copy(self.head.home / ".ray" / "auth_token", self.worker.home / ".ray" / "auth_token")
        self.worker.run(WORKER_START.format(**self.where), *SMALL_NODE, "--temp-dir", str(self.worker.ray_temp),
                        cwd=self.worker.home, timeout=180)
        deadline = time.monotonic() + 120  # the autoscaler's view of the cluster lags the worker's start
        while active_nodes(status := self.head.run(STATUS.format(**self.where), cwd=work, timeout=60)) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray status never listed both nodes:\n{status}")
            time.sleep(2)

    def processes(self) -> set[int]:
        return in_namespaces(self.inodes)

    def measure(self, clients: int, virtual: bool) -> dict:
        from deployment import DRIVER

        args, report_path = self.args, self.work / f"ray-{clients}-{'virtual' if virtual else 'actors'}.json"
        flags = run_args(clients, args, virtual)
        if not virtual:  # 3 actors on two 1-CPU nodes: the default share (2/3 CPU) fits one a node
            flags += ["--cpus-per-client", "0.5"]
        command = self.head.command(DRIVER.format(**self.where), *flags, "--report", str(report_path))
        proc = subprocess.Popen(command, cwd=self.work, env=self.head.env(SPLIT_AUTH_TOKEN=self.token),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        memory = TreeMemory(proc.pid, args.interval, self.processes)
        try:
            _, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the rest of the hosts' processes go with the namespaces
            raise
        finally:
            memory.stop()
        if proc.returncode:
            raise RuntimeError(f"split-ray --clients {clients} exited {proc.returncode}: {err[-3000:]}")
        report = json.loads(report_path.read_text())
        rows = [json.loads(line) for line in report_path.with_suffix(".clients.jsonl").read_text().splitlines()]
        nodes: dict[str, int] = {}
        for row in rows:
            if row.get("node_ip"):
                nodes[row["node_ip"]] = nodes.get(row["node_ip"], 0) + 1
        result = entry(clients, virtual, report, memory)
        result["ray_nodes"] = sorted(n["node_ip"] for n in report["ray_nodes"])
        result["clients_by_node"] = nodes  # the node each client last ran on: its worker's (or its actor's)
        result["clients_ok"] = report["clients_ok"]
        return result

    def stop(self) -> None:
        if self.server:
            self.server.stop(timeout=20)
            self.server = None


def measure_hosts(args: argparse.Namespace) -> tuple[dict | None, list[dict], dict]:
    """The baseline and each N on one two-node cluster (see the module's doc); the hosts' addresses."""
    from netns import NotPermitted, can_make_namespaces, network

    reason = can_make_namespaces()
    if reason:
        raise NotPermitted(reason)
    with tempfile.TemporaryDirectory(prefix="scale-hosts-") as temp, \
            network(HOST_ADDRESSES, Path(temp), prefix="mhsc") as hosts:
        work = Path(temp) / "work"
        work.mkdir()
        cluster = Cluster(hosts, work, args)
        try:
            baseline = cluster.measure(args.baseline, virtual=False) if args.baseline else None
            print(f"baseline {args.baseline} clients: peak {baseline['peak_rss_mb']:.0f} MB RSS" if baseline else
                  "no baseline", file=sys.stderr, flush=True)
            runs = []
            for n in args.clients:
                runs.append(cluster.measure(n, virtual=True))
                print(f"{n} clients: peak {runs[-1]['peak_rss_mb']:.0f} MB RSS", file=sys.stderr, flush=True)
        finally:
            cluster.stop()
    return baseline, runs, HOST_ADDRESSES


def checks(run: dict, hosts: bool) -> list[str]:
    """What a run fails of: every client fine, server steps = client steps, and on --hosts both nodes used."""
    failed = []
    if run["failed"]:
        failed.append(f"{run['failed']} clients failed")
    if run["server_steps_applied"] != run["client_steps_sent"]:
        failed.append(f"server applied {run['server_steps_applied']} steps, clients sent {run['client_steps_sent']}")
    if hosts and len(run["clients_by_node"]) < 2:
        failed.append(f"clients ran on {sorted(run['clients_by_node'])} only")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", default="splitfed", choices=["sequential", "parallel", "splitfed"])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--local-steps", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=int, default=3, help="clients of the one-actor-per-client run (0: none)")
    p.add_argument("--baseline-max-steps", type=int, default=0,
                   help="the baseline's clients stop after this many steps (0: every round's epoch)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="")
    p.add_argument("--hosts", action="store_true",
                   help="on a two-node Ray cluster and a cloud host, each a network namespace (needs root)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    args = p.parse_args(argv)
    addresses = None
    if args.hosts:
        baseline, runs, addresses = measure_hosts(args)
    else:
        baseline = measure(args.baseline, args, virtual=False) if args.baseline else None
        runs = []
        for n in args.clients:
            runs.append(measure(n, args, virtual=True))
            print(f"{n} clients: peak {runs[-1]['peak_rss_mb']:.0f} MB RSS, {runs[-1]['samples_per_second']:.0f} "
                  "samples/s", file=sys.stderr)
    problems = []
    for run in ([baseline] if baseline else []) + runs:
        if baseline and run is not baseline:
            run["peak_rss_over_baseline"] = run["peak_rss_mb"] / baseline["peak_rss_mb"]
            run["peak_pss_over_baseline"] = run["peak_pss_mb"] / baseline["peak_pss_mb"]
        run["checks_failed"] = checks(run, args.hosts)
        problems += run["checks_failed"]
    print(json.dumps({"dataset": args.dataset, "mode": args.mode, "workers": args.workers, "fraction": args.fraction,
                      "local_steps": args.local_steps, "rounds": args.rounds, "cpu_cores": os.cpu_count(),
                      "hosts": addresses, "baseline": baseline, "runs": runs}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
