"""Label leakage of the U-shaped split against real processes on loopback, per label defense
(docs/ATTACKS_AND_METRICS.md §7). One `cloud-server --tap` records what the cloud receives; per
seed, `edge-client` trains the vanilla split (its accuracy is the reference) and the U-shaped
split once per defense setting; `attacker labels` then infers every U-shaped run's training
labels from the gradients it sent up (one known label per class per batch) and the harness
scores it.

Prints one JSON object (`runs`: one row per run; `table`: mean and spread over seeds per
setting) and writes it to `--out DIR/label_leak.json` with the reports beside it (the tap, every
feature of every run, lives in a temporary folder), and `label_leak.png`: test accuracy against
the labels recovered, per step and in the first epoch, a point per setting. `--plot DIR [DIR...]`
draws that figure again from finished folders, their settings together.

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
    p.add_argument("--plot", nargs="+", default=[], metavar="DIR",
                   help="only draw DIR[0]/label_leak.png from these folders' label_leak.json")
    args = p.parse_args(argv)
    if args.plot:
        rows = [row for folder in args.plot for row in json.loads((Path(folder) / "label_leak.json").read_text())["table"]]
        plot(rows, Path(args.plot[0]) / "label_leak.png")
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="label-leak-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="label-leak-tap-") as tap:  # every feature of every run: large
        server = start_server("--tap", tap, "--threads", "1", fork=False)
        try:
            for seed in args.seeds:
                for setting in args.settings:
                    runs.append(_run(server.address, Path(tap), out, setting, seed, args))
        finally:
            server.stop()
    result = {"epochs": args.epochs, "edge_args": args.edge_args, "runs": runs, "table": _table(runs)}
    (out / "label_leak.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result["table"], out / "label_leak.png")
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


def plot(table: list[dict], path: Path) -> None:
    """Test accuracy against the share of labels the cloud recovered (nearest-known attack), over the
    run and in its first epoch: a point per setting ("g4": gaussian, strength 4), spread over seeds as
    error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in table if "nearest_known_accuracy" in r]
    for key, marker, label in (("nearest_known_accuracy", "o", "over the run, per step"),
                               ("first_epoch_nearest_known_accuracy", "s", "first epoch")):
        ax.errorbar([r[key] for r in rows], [r["test_accuracy"] for r in rows], xerr=[r[f"{key}_std"] for r in rows],
                    yerr=[r["test_accuracy_std"] for r in rows], fmt=marker, label=label, capsize=2)
        for r in rows:
            ax.annotate(r["setting"].replace("gaussian:", "g"), (r[key], r["test_accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    vanilla = [r for r in table if r["setting"] == "vanilla"]
    if vanilla:
        ax.axhline(vanilla[0]["test_accuracy"], color="grey", ls="--", lw=1, label="vanilla split (labels in clear)")
    ax.axvline(0.1, color="grey", ls=":", lw=1, label="chance (10 classes)")
    ax.set_xlabel("labels recovered by the cloud (nearest-known attack, 1 known label per class per batch)")
    ax.set_ylabel("test accuracy")
    ax.set_title("U-shaped split: accuracy vs label leakage, per label defense")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
