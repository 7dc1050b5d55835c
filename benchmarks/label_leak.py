"""Label leakage of the U-shaped split against real processes on loopback, per label defense
(docs/ATTACKS_AND_METRICS.md §7). One `cloud-server --tap` records what the cloud receives; per
seed, `edge-client` trains the vanilla split (its accuracy is the reference) and the U-shaped
split once per defense setting; `attacker labels` then infers every U-shaped run's training
labels from the gradients it sent up (one known label per class per batch) and the harness
scores it.

Prints one JSON object (`runs`: one row per run; `table`: mean and spread over seeds per
setting) and writes it to `--out DIR/label_leak.json` with the reports beside it (the tap, every
feature of every run, lives in a temporary folder).

    python benchmarks/label_leak.py --seeds 0 1 --epochs 10 --out results/labels
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy.processes import start_server

SETTINGS = ["vanilla", "none", "gaussian:0.05", "gaussian:0.1", "gaussian:0.25", "gaussian:0.5", "gaussian:1",
            "max_norm"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=10, help="edge-client --epochs (its default: 10)")
    p.add_argument("--settings", nargs="+", default=SETTINGS,
                   help="vanilla (the reference, no attack), or a --label-defense KIND[:STRENGTH] of the U-shaped split")
    p.add_argument("--edge-args", default="", help="more edge-client flags, one string (e.g. a dataset)")
    p.add_argument("--out", default="", help="keep reports and scores here (default: a temporary folder)")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="label-leak-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="label-leak-tap-") as tap:  # every feature of every run: large
        server = start_server("--tap", tap, "--threads", "1")
        try:
            for seed in args.seeds:
                for setting in args.settings:
                    runs.append(_run(server.address, Path(tap), out, setting, seed, args))
        finally:
            server.stop()
    result = {"epochs": args.epochs, "edge_args": args.edge_args, "runs": runs, "table": _table(runs)}
    (out / "label_leak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _run(server: str, tap: Path, out: Path, setting: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{setting.replace(':', '-')}__s{seed}"
    report = out / f"{name}.json"
    flags = [] if setting == "vanilla" else ["--u-shaped", *_defense_flags(setting)]
    command = [sys.executable, "-m", "edge_client", "--server", server, "--seed", str(seed), "--epochs",
               str(args.epochs), "--job", name, "--report", str(report), "--no-progress", "--threads", "1",
               *args.edge_args.split(), *flags]
    with open(report.with_suffix(".log"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    edge = json.loads(report.read_text())
    row = {"setting": setting, "seed": seed, "test_accuracy": edge["test_accuracy"],
           "bytes_up_per_step": edge["bytes_up_per_step"], "bytes_down_per_step": edge["bytes_down_per_step"]}
    if setting != "vanilla":
        scored = out / f"{name}-labels"
        subprocess.run([sys.executable, "-m", "attacks", "labels", "--capture", str(tap), "--edge-report",
                        str(report), "--out", str(scored)], check=True, capture_output=True)
        leak = json.loads((scored / "labels.json").read_text())
        row.update({"direction_accuracy": leak["per_step"]["direction_accuracy"],
                    "nearest_known_accuracy": leak["per_step"]["nearest_known_accuracy"],
                    "pooled_direction_accuracy": leak["pooled"]["direction_accuracy"],
                    "first_epoch_direction_accuracy": leak["per_epoch"][0]["direction_accuracy"],
                    "first_epoch_nearest_known_accuracy": leak["per_epoch"][0]["nearest_known_accuracy"]})
    print(json.dumps(row), file=sys.stderr)
    return row


def _defense_flags(setting: str) -> list[str]:
    kind, _, strength = setting.partition(":")
    return ["--label-defense", kind, *(["--label-defense-strength", strength] if strength else [])]


def _table(runs: list[dict]) -> list[dict]:
    """Per setting: the mean over seeds of each figure, and its spread (population std)."""
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        members = [r for r in runs if r["setting"] == setting]
        row = {"setting": setting, "seeds": [r["seed"] for r in members]}
        for key in ("test_accuracy", "direction_accuracy", "nearest_known_accuracy", "pooled_direction_accuracy",
                    "first_epoch_direction_accuracy", "first_epoch_nearest_known_accuracy", "bytes_up_per_step"):
            values = [r[key] for r in members if key in r]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.pstdev(values)
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
