"""Would server-side micro-batching of concurrent steps pay? Measured on the decoder alone.

With N clients in parallel, the job lock applies their steps one after another:
N forward/backward/optimizer steps of batch B. Micro-batching would run one step of
batch N*B instead (and change the optimisation: one update where there were N). This
times both on the decoder, side by side in one run, and prints one JSON object.

    python benchmarks/microbatch.py --clients 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from splitnet import models
from splitnet.cli_util import add_threads_arg, set_threads


def _step(decoder: nn.Module, opt: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor) -> None:
    z = z.clone().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(decoder(z), y).backward()
    opt.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    add_threads_arg(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    split = models.build(models.SplitSpec())
    decoder = split.decoder
    opt = models.OptimSpec().make(decoder.parameters())
    zs = [torch.rand(args.batch_size, *split.feature_shape) for _ in range(args.clients)]
    ys = [torch.randint(0, 10, (args.batch_size,)) for _ in range(args.clients)]
    z_all, y_all = torch.cat(zs), torch.cat(ys)
    separate, batched = [], []
    for _ in range(3):  # warm up
        _step(decoder, opt, z_all, y_all)
    for _ in range(args.rounds):
        t = time.perf_counter()
        for z, y in zip(zs, ys):
            _step(decoder, opt, z, y)
        separate.append(time.perf_counter() - t)
        t = time.perf_counter()
        _step(decoder, opt, z_all, y_all)
        batched.append(time.perf_counter() - t)
    sep, bat = statistics.median(separate), statistics.median(batched)
    print(json.dumps({"clients": args.clients, "batch_size": args.batch_size, "threads": args.threads,
                      "separate_ms": sep * 1e3, "microbatched_ms": bat * 1e3,
                      "speedup_microbatched": sep / bat}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
