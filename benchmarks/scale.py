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
from pathlib import Path

from deploy.processes import descendants


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
    return Path(argv[0]).name


class TreeMemory:
    """The peak, over samples, of the memory summed over a process and everything below it, and the
    resident memory of each kind of process at that peak."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.processes = 0
        self.by_process: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            pids = {self.pid} | descendants(self.pid)
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


def measure(clients: int, args: argparse.Namespace, virtual: bool) -> dict:
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        command = [sys.executable, "-m", "deploy.sim.cli", "--start-server", "--clients", str(clients), "--mode",
                   args.mode, "--epochs", str(args.rounds), "--no-progress", "--report", f"{temp}/ray.json"]
        if virtual:
            command += ["--workers", str(args.workers), "--fraction", str(args.fraction), "--local-steps",
                        str(args.local_steps)]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", default="splitfed", choices=["sequential", "parallel", "splitfed"])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--local-steps", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=int, default=3, help="clients of the one-actor-per-client run (0: none)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    args = p.parse_args(argv)
    baseline = measure(args.baseline, args, virtual=False) if args.baseline else None
    runs = []
    for n in args.clients:
        runs.append(measure(n, args, virtual=True))
        if baseline:
            runs[-1]["peak_rss_over_baseline"] = runs[-1]["peak_rss_mb"] / baseline["peak_rss_mb"]
            runs[-1]["peak_pss_over_baseline"] = runs[-1]["peak_pss_mb"] / baseline["peak_pss_mb"]
        print(f"{n} clients: peak {runs[-1]['peak_rss_mb']:.0f} MB RSS, {runs[-1]['samples_per_second']:.0f} "
              "samples/s", file=sys.stderr)
    print(json.dumps({"dataset": "digits", "mode": args.mode, "workers": args.workers, "fraction": args.fraction,
                      "local_steps": args.local_steps, "rounds": args.rounds, "cpu_cores": os.cpu_count(),
                      "baseline": baseline, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
