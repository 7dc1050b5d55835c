"""Split over gRPC vs single process: the same model, data and seed, measured side by side.

Runs (a) the whole model in this process (`LocalCloud`) and (b) the encoder here with
the decoder in a real `cloud-server` process on 127.0.0.1, alternating a and b
`--repeats` times, and prints one JSON object with the median samples/s of each and
`ratio_split_over_local`. The local baseline runs with this process's threads (1, like
each side of the split) and again with 2 threads (the whole 2-core machine):
`ratio_split_over_local_2threads`. With `--pipeline N` it also runs the split with N steps in
flight (bounded staleness) and reports `ratio_pipelined_over_local`.

The model is the digits cnn, or with `--cifar10 DIR` the converged CIFAR-10 study's
(`model_flags.py`): there the batch is 128, as in the study, unless `--batch-size` says otherwise.

    python benchmarks/transport.py --batch-size 64 --steps 60
    python benchmarks/transport.py --cifar10 data/cifar10 --steps 30 --pipeline 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from cloud_server.local import LocalCloud
from deploy.processes import start_server
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run

import model_flags  # the sibling module: the model flags inference.py and floor.py share


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags.add(p)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (digits) or 128 (--cifar10)")
    p.add_argument("--steps", type=int, default=60, help="training steps per measured run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codec", default="fp32")
    p.add_argument("--pipeline", type=int, default=0, help="also measure N steps in flight (0: skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this (edge) process; the server uses 1 (default %(default)s)")
    args = model_flags.resolve(p.parse_args(argv))
    args.batch_size = args.batch_size or (128 if args.cifar10 else 64)
    torch.set_num_threads(args.threads)

    splits = model_flags.load(args)
    epochs = -(-args.steps * args.batch_size // len(splits.train))
    base = EdgeConfig(data=model_flags.data_spec(args), arch=args.arch, cut=args.cut, width=args.width,
                      bottleneck=args.bottleneck, batch_size=args.batch_size, epochs=epochs, max_steps=args.steps,
                      codec=args.codec, progress=False)
    server = start_server(fork=False)
    variants = {"local": (base, LocalCloud), "local_2threads": (base, LocalCloud),
                "split": (_remote(base, server.address, 0), None)}
    if args.pipeline:
        variants["pipelined"] = (_remote(base, server.address, args.pipeline), None)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    rtts: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for rep in range(args.repeats + 1):  # the first round warms up caches and is dropped
            for name, (config, factory) in variants.items():
                config = dataclasses.replace(config, job=f"{name}-{rep}")
                cloud = factory() if factory else RemoteCloud(config.connection)
                torch.set_num_threads(2 if name == "local_2threads" else args.threads)
                report = run(config, cloud, splits)
                if rep:
                    rates[name].append(report["samples_per_second"])
                    rtts[name].append(report["rtt_ms_p50"])
    finally:
        server.stop()
    median = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "arch": base.arch, "cut": base.cut or "default", "width": base.width, "bottleneck": base.bottleneck,
        "dataset": "cifar10" if args.cifar10 else "digits", "batch_size": args.batch_size, "steps": args.steps,
        "codec": args.codec, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "samples_per_second": median, "samples_per_second_runs": rates,
        "rtt_ms_p50_split": statistics.median(rtts["split"]),
        "ratio_split_over_local": median["split"] / median["local"],
        "ratio_split_over_local_2threads": median["split"] / median["local_2threads"],
    }
    if args.pipeline:
        result["pipeline"] = args.pipeline
        result["ratio_pipelined_over_local"] = median["pipelined"] / median["local"]
        result["ratio_pipelined_over_local_2threads"] = median["pipelined"] / median["local_2threads"]
    print(json.dumps(result, indent=2))
    return 0


def _remote(base: EdgeConfig, address: str, pipeline: int) -> EdgeConfig:
    return dataclasses.replace(base, connection=ConnectionConfig(server=address, pipeline=pipeline))


if __name__ == "__main__":
    sys.exit(main())
