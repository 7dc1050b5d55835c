"""How long each console script takes to answer `--help`, and a cloud server to serve.

`--help` should be instant: a command line that imports torch before it parses its
arguments makes every typo cost seconds. The server figure is what a caller (a test,
the demo, a sweep, an orchestrator's readiness probe) waits before its first call:
from spawning `cloud-server` to the first gRPC health check that answers SERVING.
Each figure is the median of `--repeats` runs, as whole processes (the scripts next
to this interpreter), and the output one JSON object.

    python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SCRIPTS = ("edge-client", "cloud-server", "split-ray", "attacker", "split-sweep", "split-demo", "split-link", "split-plan")
BIN = Path(sys.executable).parent


def help_seconds(script: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / script), "--help"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_seconds(timeout: float = 60.0) -> float:
    """Spawn to the first SERVING answer of the standard health service (all services: "")."""
    address = f"127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "cloud-server"), "--port", address.rsplit(":", 1)[1]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - start < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"cloud-server exited with {proc.returncode} before serving")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - start
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.01)
        raise TimeoutError(f"cloud-server not SERVING after {timeout} s")
    finally:
        proc.terminate()
        proc.wait(20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is reported (default %(default)s)")
    args = p.parse_args(argv)
    result = {f"{script} --help": statistics.median(help_seconds(script) for _ in range(args.repeats))
              for script in SCRIPTS}
    result["cloud-server to SERVING"] = statistics.median(serving_seconds() for _ in range(args.repeats))
    print(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
