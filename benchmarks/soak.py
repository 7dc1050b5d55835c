"""Soak: N clients train against one `cloud-server` process for a long time; is memory flat?

Starts a server on 127.0.0.1, runs `--clients` threads that each open a session and send
lock-step TrainSteps on one stream (raw gRPC stubs, small feature tensors: the server's
bookkeeping is what is soaked, not the decoder's arithmetic), samples the server
process's resident memory every `--sample-every` seconds, and prints one JSON object:

    rss_mb_start / rss_mb_end / rss_mb_max   server RSS, MiB
    rss_slope_mb_per_min                     least-squares slope after --warmup seconds
    steps_applied                            by the server (its Stats) == steps the clients got back
    latency_ms_p50 / latency_ms_p99          per step, send to reply, as the clients saw it

    python benchmarks/soak.py --duration 600 --clients 8

`LoadClient` is also the client of tests/test_load.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import torch

from edge_client.remote import HeldStream
from edge_client.report import percentile
from splitnet import codec, serde
from splitnet.models import OptimSpec, SplitSpec
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

FEATURE_SHAPE = (64, 4, 4)  # cnn cut block2 of a 16x16 input: 4 KiB a sample in fp32


def session_spec(job: str, client_id: str) -> pb.SessionSpec:
    return serde.session_spec_to_proto(serde.SessionSpec(job, client_id, SplitSpec("cnn", "block2", 10, (1, 16, 16)),
                                                         FEATURE_SHAPE, OptimSpec(0.01, 0.9, 0.0), "fp32"))


class LoadClient:
    """One client: a session and one Train stream driven lock-step; records each step's latency."""

    def __init__(self, stub: split_pb2_grpc.SplitLearningStub, job: str, client_id: str, batch: int = 2,
                 deadline_s: float = 30.0) -> None:
        self.session_id = serde.session_from_proto(stub.OpenSession(session_spec(job, client_id),
                                                                    timeout=deadline_s)).session_id
        self.deadline_s = deadline_s
        generator = torch.Generator().manual_seed(zlib.crc32(client_id.encode()))
        # A few batches, re-sent in turn: building tensors is not what is measured.
        self._batches = [(codec.encode(torch.rand(batch, *FEATURE_SHAPE, generator=generator)),
                          torch.randint(0, 10, (batch,), generator=generator).tolist()) for _ in range(8)]
        self._stream = HeldStream(stub.Train)  # the edge's own stream, with its per-step deadline watchdog
        self.latency_ms: list[float] = []
        self.duplicates = 0

    def run(self, steps: int | None = None, until: float | None = None) -> None:
        """Send steps 1, 2, ... until `steps` are done or the monotonic clock passes `until`."""
        step_id = 0
        try:
            while (steps is None or step_id < steps) and (until is None or time.monotonic() < until):
                step_id += 1
                features, labels = self._batches[step_id % len(self._batches)]
                sent = time.perf_counter()
                self._stream.send(serde.train_step_to_proto(serde.TrainStep(self.session_id, step_id, features,
                                                                            labels)))
                result = self._stream.receive(self.deadline_s)  # a hung server fails the run, not hangs it
                self.latency_ms.append((time.perf_counter() - sent) * 1e3)
                reply = serde.train_result_from_proto(result)
                if reply.step_id != step_id:
                    raise RuntimeError(f"reply for step {reply.step_id}, expected {step_id}")
                self.duplicates += reply.duplicate
        finally:
            self._stream.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process: psutil where installed, else /proc (Linux)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return psutil.Process(pid).memory_info().rss


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, per minute."""
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in samples], [v for _, v in samples]).slope * 60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default %(default)s)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=2, help="samples per step")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the slope")
    args = p.parse_args(argv)
    from deploy.processes import start_server

    server = start_server("--threads", "1", fork=False)
    samples: list[tuple[float, float]] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            clients = [LoadClient(stub, "soak", f"soak-{i}", args.batch) for i in range(args.clients)]
            start = time.monotonic()
            until = start + args.duration
            threads = [threading.Thread(target=c.run, kwargs={"until": until}, daemon=True) for c in clients]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                samples.append((time.monotonic() - start, rss_bytes(server.proc.pid) / 2**20))
                time.sleep(min(args.sample_every, max(0.0, until - time.monotonic()) + 0.1))
            samples.append((time.monotonic() - start, rss_bytes(server.proc.pid) / 2**20))
            stats = serde.stats_reply_from_proto(stub.Stats(serde.stats_request_to_proto("soak"), timeout=30))
    finally:
        server.stop()
    latencies = [ms for c in clients for ms in c.latency_ms]
    steady = [s for s in samples if s[0] >= args.warmup] or samples
    print(json.dumps({
        "duration_s": round(samples[-1][0], 1),
        "clients": args.clients,
        "batch": args.batch,
        "rss_mb_start": round(samples[0][1], 1),
        "rss_mb_end": round(samples[-1][1], 1),
        "rss_mb_max": round(max(v for _, v in samples), 1),
        "rss_slope_mb_per_min": round(slope_per_minute(steady), 3),
        "rss_samples": len(samples),
        "steps_applied": stats.steps_applied,
        "steps_replied": len(latencies),
        "steps_duplicate": stats.steps_duplicate,
        "steps_per_second": round(len(latencies) / samples[-1][0], 1),
        "latency_ms_p50": round(percentile(latencies, 50), 2),
        "latency_ms_p99": round(percentile(latencies, 99), 2),
        "cpus": os.cpu_count(),
    }))
    return 0 if stats.steps_applied == len(latencies) else 1


if __name__ == "__main__":
    sys.exit(main())
