"""How far apart do runs of one recipe land? Test accuracy over seeds and codecs.

"Attack MSE with and without a defense at matched accuracy" means nothing if the same
undefended recipe lands several points apart from seed to seed. This starts one real
`cloud-server` process, trains one undefended edge client per (schedule, seed, codec)
against it through gRPC, and prints one JSON object: per schedule the accuracy of every
run, the spread (max - min) over seeds at fp32, and the largest gap between a codec and
fp32 at the same seed, all measured in this one run.

    python benchmarks/seed_stability.py --schedules constant cosine --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys

from deploy.processes import start_server
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run
from splitnet.cli_util import set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", nargs="+", default=["constant", "cosine"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--codecs", nargs="+", default=["fp32", "fp16", "int8"])
    p.add_argument("--epochs", type=int, default=EdgeConfig.epochs)
    p.add_argument("--lr", type=float, default=EdgeConfig.lr)
    args = p.parse_args(argv)
    set_threads(1)
    server = start_server("--threads", "1", fork=False)
    result: dict = {"epochs": args.epochs, "lr": args.lr, "schedules": {}}
    try:
        for schedule in args.schedules:
            runs: dict[str, dict[int, float]] = {c: {} for c in args.codecs}
            for seed in args.seeds:
                for codec_name in args.codecs:
                    config = EdgeConfig(connection=ConnectionConfig(server=server.address), epochs=args.epochs,
                                        lr=args.lr, lr_schedule=schedule, codec=codec_name, grad_codec=codec_name,
                                        seed=seed, job=f"{schedule}-{seed}-{codec_name}", progress=False)
                    runs[codec_name][seed] = run(config, RemoteCloud(config.connection))["test_accuracy"]
                    print(f"{schedule} seed {seed} {codec_name}: {runs[codec_name][seed]:.4f}", file=sys.stderr)
            fp32 = runs[args.codecs[0]]
            result["schedules"][schedule] = {
                "accuracy": runs,
                "seed_spread_points": 100 * (max(fp32.values()) - min(fp32.values())),
                "max_codec_gap_points": 100 * max(abs(runs[c][s] - fp32[s]) for c in args.codecs[1:]
                                                  for s in args.seeds) if len(args.codecs) > 1 else 0.0,
            }
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
