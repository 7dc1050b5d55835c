"""Aggregate training throughput of N edge clients (Ray actors), sequential vs parallel.

Starts a local Ray on 127.0.0.1 and a `cloud-server` process, then for N = 1, 2, 4
(`--clients`) runs `split-ray`'s sequential and parallel modes on digits and prints one
JSON object: per row the aggregate samples/s over the training rounds after the first
(actor start-up, the first round's warm-up and evaluation excluded), and per N the
ratio parallel / sequential, all measured in this one run. Sequential clients take
turns, so their aggregate is one client's rate; parallel clients overlap their encoder
work and their round trips, as far as the cores (shared with the server) allow.

    python benchmarks/multiclient.py --epochs 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from deploy.sim.config import RayRunConfig, ray_environment
from edge_client.config import ConnectionConfig, EdgeConfig

# Loopback only, and no token file in ~/.ray: this cluster lives only as long as the benchmark.
ENV = {**ray_environment(local=True), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["sequential", "parallel"], choices=["sequential", "parallel"])
    p.add_argument("--epochs", type=int, default=3, help="rounds per run, the first one not measured")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--codec", default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="runs of each row; the median is reported")
    args = p.parse_args(argv)
    os.environ.update(ENV)  # before Ray is imported
    import ray

    from deploy.processes import start_server
    from deploy.sim.run import run_clients

    server = start_server(fork=False)
    ray.init(include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)  # inherits ENV
    rates: dict[tuple[int, str], list[float]] = {(n, mode): [] for n in args.clients for mode in args.modes}
    steps_equal = True
    try:
        for rep in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every row
            for n, mode in rates:
                edge = EdgeConfig(connection=ConnectionConfig(server=server.address), epochs=args.epochs,
                                  batch_size=args.batch_size, codec=args.codec, job=f"bench-{mode}-{n}-{rep}",
                                  progress=False)
                report = run_clients(RayRunConfig(edge, clients=n, mode=mode))
                measured = report["rounds"][1:] or report["rounds"]
                rates[n, mode].append(sum(r["samples"] for r in measured) / sum(r["seconds"] for r in measured))
                steps_equal &= report["server_steps_applied"] == report["client_steps_sent"]
                print(f"{n} clients {mode}: {rates[n, mode][-1]:.0f} samples/s", file=sys.stderr)
    finally:
        ray.shutdown()
        server.stop()
    median = {key: statistics.median(v) for key, v in rates.items()}
    result = {
        "dataset": "digits", "epochs": args.epochs, "batch_size": args.batch_size, "codec": args.codec,
        "repeats": args.repeats, "cpu_cores": os.cpu_count(), "torch_threads_per_client": 1,
        "rows": [{"clients": n, "mode": mode, "samples_per_second": median[n, mode],
                  "samples_per_second_runs": rates[n, mode]} for n, mode in rates],
        # N = 1 is the same work in both modes: its ratio is the measurement noise.
        "parallel_over_sequential": {str(n): median[n, "parallel"] / median[n, "sequential"] for n in args.clients
                                     if (n, "parallel") in median and (n, "sequential") in median},
        "server_steps_applied_equals_client_steps_sent": steps_equal,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
