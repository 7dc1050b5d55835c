"""The feature defenses (CEM's surrogates, attacker-aware training, learned pruning) in the CEM
paper's regime on digits, paired with noise alone seed by seed.

Each setting trains one edge in-process (cnn block1, 8-channel sigmoid bottleneck, the
CEM paper's schedule scaled to --epochs, so CEM reaches full lambda in the last quarter),
then the noise-aware inversion network (width 32, as the demo's) attacks the test set's
features. The gain of a setting is its attack MSE over noise alone's at the same seed:
the noise-alone MSE itself moves ~20% between seeds, far more than the pairing does.
Prints one JSON object: per setting and seed the accuracy, attack MSE / SSIM / PSNR, the
class-conditional spread, the per-epoch pull and gate means, and the paired gains.

    python benchmarks/cem_regime.py --settings gmm:8 gated:8 slot:8 slot:4 --seeds 0 1
    python benchmarks/cem_regime.py --settings adv:1 adv:4 prune:0.5 adv:4+prune:0.5 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from edge_client.config import DefenseConfig
from gate_collapse import study  # the sibling script: train in-process, then attack


def defense(setting: str, sigma: float) -> DefenseConfig:
    """'noise', or defenses joined by '+': SURROGATE:LAMBDA[:gates] (':gates' turns the soft and SNR
    gates on), adv:A (attacker-aware training at weight A), prune:R (learned pruning of the share R
    of the channels); e.g. adv:2+prune:0.5."""
    fields: dict = {"noise": sigma}
    for part in setting.split("+") if setting != "noise" else []:
        name, value, *rest = part.split(":")
        if name == "adv":
            fields["adv_weight"] = float(value)
        elif name == "prune":
            fields["prune_ratio"] = float(value)
        else:
            fields.update(cem=name, lam=float(value), cem_gates=True if rest == ["gates"] else None)
    return DefenseConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["gmm:8", "gated:8", "slot:8"],
                   help="SURROGATE:LAMBDA[:gates], adv:A, prune:R, or several joined by '+'; noise alone always "
                        "runs as the reference")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--attack-epochs", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs: dict[str, dict[int, dict]] = {}
    for setting in ["noise", *args.settings]:
        for seed in args.seeds:
            runs.setdefault(setting, {})[seed] = study(defense(setting, args.sigma), args.epochs, args.attack_epochs,
                                                       seed, lr_schedule="paper", attack_width=32)
            print(f"{setting} seed {seed}: accuracy {runs[setting][seed]['test_accuracy']:.3f}, "
                  f"attack MSE {runs[setting][seed]['attack_mse']:.5f}", file=sys.stderr)
    gains = {s: {seed: {"attack_mse_gain_pct": 100 * (r["attack_mse"] / runs["noise"][seed]["attack_mse"] - 1),
                        "accuracy_delta_points": 100 * (r["test_accuracy"] - runs["noise"][seed]["test_accuracy"])}
                 for seed, r in by_seed.items()} for s, by_seed in runs.items() if s != "noise"}
    print(json.dumps({"settings": vars(args), "runs": runs, "paired_gains": gains}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
