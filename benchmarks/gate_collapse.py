"""The gate-collapse hazard (docs/CEM.md §5.1), measured.

A learnable gate trained on the very loss it gates can learn to close (soft gate -> 0
makes rob_loss -> 0 without any compaction). This trains the same edge twice on digits,
CEM with learnable gates and CEM with gates that do not learn from rob_loss, plus noise
alone as the reference; logs gate means per epoch; then attacks each encoder with the
noise-aware inversion network. Prints one JSON object.

    python benchmarks/gate_collapse.py --cem gated --epochs 8
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from attacks import harness
from attacks.config import AttackConfig
from attacks.runner import Attacker
from cloud_server.local import LocalCloud
from edge_client.config import DefenseConfig, EdgeConfig
from edge_client.trainer import EdgeTrainer

GATE_KEYS = ("soft_gate_mean", "snr_gate_mean", "class_gate_mean", "attn_max_mean", "slot_weight_max", "rob_loss_mean",
             "batch_intra_mse")


def study(defense: DefenseConfig, epochs: int, attack_epochs: int, seed: int, lr_schedule: str = "cosine",
          attack_width: int | None = None) -> dict:
    """Train one edge in-process on digits (cnn, bottleneck 8), then attack its inference features."""
    trainer = EdgeTrainer(EdgeConfig(epochs=epochs, bottleneck=8, defense=defense, seed=seed, lr_schedule=lr_schedule,
                                     progress=False), LocalCloud())
    trainer.open()
    for _ in range(epochs):
        trainer.train_epoch()
    accuracy = trainer.evaluate()
    report = trainer.report(accuracy)
    attack = AttackConfig("inversion", epochs=attack_epochs, width=attack_width, seed=seed, progress=False)
    attacker = Attacker(attack, trainer.split.spec, trainer.splits.train, encoder=trainer.encoder,
                        obfuscate=trainer.to_wire).fit()
    truth = torch.cat(harness.private_requests(trainer.splits.test, trainer.eval_batch_size))
    scores = harness.score(attacker.reconstruct(torch.cat([trainer.encode(x) for x in truth.split(256)])), truth,
                           "inversion")
    return {"test_accuracy": accuracy, "intra_mse": report["intra_mse"], "defense": report["defense"],
            **{f"attack_{k}": scores[k] for k in ("mse", "ssim", "psnr")},
            "per_epoch": [{k: h[k] for k in ("epoch", *GATE_KEYS, "cem_pull", "cem_w_lr", "adv_mse", "adv_share")
                           if k in h} for h in report["history"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cem", default="gated", choices=("gated", "slot"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=16.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attack-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = DefenseConfig(noise=args.noise)
    # the gates are what this measures, so they are on whatever the surrogate's default
    cem = DefenseConfig(noise=args.noise, cem=args.cem, lam=args.lam, cem_warmup=args.warmup, cem_gates=True)
    variants = {"noise_only": base, "learnable_gates": cem,
                "frozen_gates": DefenseConfig(**{**cem.__dict__, "learn_gates": False})}
    result = {"settings": vars(args),
              "runs": {name: study(d, args.epochs, args.attack_epochs, args.seed) for name, d in variants.items()}}
    runs = result["runs"]
    result["less_leakage"] = min(("learnable_gates", "frozen_gates"), key=lambda n: runs[n]["attack_ssim"])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
