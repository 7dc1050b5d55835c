"""Split-training throughput of vgg11_bn at the CEM paper's cut, by width multiplier.

Starts one real `cloud-server` process and trains one edge client through gRPC per width
on random CIFAR-shaped images (3x32x32, 10 classes, augmentation on, batch 128, cut pool2
with the 8-channel sigmoid bottleneck), then prints one JSON object: samples/s of each
width over the measured steps (the first `--warmup` steps excluded) and each width's
speed relative to full width, measured side by side in this one run. What a CIFAR-10
epoch (50,000 images) then takes is `seconds_per_cifar_epoch`.

    python benchmarks/width.py --widths 0.25 0.5 1.0 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch
from torch.utils.data import TensorDataset

from deploy.processes import start_server
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer
from splitnet import data
from splitnet.cli_util import set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--steps", type=int, default=30, help="measured steps per width")
    p.add_argument("--warmup", type=int, default=5, help="steps per width not measured")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pipeline", type=int, default=0)
    args = p.parse_args(argv)
    set_threads(1)
    g = torch.Generator().manual_seed(0)
    n = (args.steps + args.warmup) * args.batch_size
    images = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    splits = data.Splits(images, images, 10, (3, 32, 32))
    server = start_server("--threads", "1", fork=False)
    result: dict = {"batch_size": args.batch_size, "pipeline": args.pipeline, "widths": {}}
    try:
        for width in args.widths:
            config = EdgeConfig(connection=ConnectionConfig(server=server.address, pipeline=args.pipeline),
                                arch="vgg11_bn", cut="pool2", bottleneck=8, width=width, epochs=2,
                                batch_size=args.batch_size, job=f"width-{width}", max_steps=args.warmup,
                                progress=False)
            trainer = EdgeTrainer(config, RemoteCloud(config.connection), splits)
            trainer.open()
            try:
                trainer.train_epoch()  # warm-up: stops after `warmup` steps
                trainer.config = replace(config, max_steps=args.warmup + args.steps)
                rate = trainer.train_epoch()["samples_per_second"]  # the measured steps alone
            finally:
                trainer.close()
            split = trainer.split
            params = sum(t.numel() for m in (split.encoder, split.decoder) for t in m.parameters())
            result["widths"][str(width)] = {"samples_per_second": rate, "seconds_per_cifar_epoch": 50_000 / rate,
                                            "parameters": params}
            print(f"width {width}: {rate:.0f} samples/s", file=sys.stderr)
    finally:
        server.stop()
    full = result["widths"].get("1.0", {}).get("samples_per_second")
    if full:
        for entry in result["widths"].values():
            entry["speed_vs_full_width"] = entry["samples_per_second"] / full
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
