"""A hijacking cloud against real edge processes on loopback, and the edge's detector against it
(docs/RESULTS_HIJACK.md). Three experiments, each its own `cloud-server` process:

- `fsha`: `cloud-server --hijack fsha --public-data digits` (its public images: the digits test
  split, disjoint from the clients' training split) against `edge-client` with its default
  settings, then with each of `--noise-levels` (`--noise SIGMA`) and of `--defenses` (named sets
  of edge flags, e.g. noise with CEM); the attacker's reconstructions of
  the private training batches are scored per step by `attacker score --by-step`, and the
  client's test accuracy through the hijacker's decoder is kept;
- `detect`: the same hijacking server against `edge-client --detect splitguard`, one run per
  seed: whether and at which step it stopped (exit status 3), and the attacker's SSIM at the
  last step it recorded before the stop;
- `honest`: an honest `cloud-server` against `edge-client --detect splitguard` per seed (false
  alarms, test accuracy), and without the detector for `--baseline-seeds` (the cost of the
  fake batches).

Prints one JSON object; `--out DIR` keeps every report, score and grid.

    python benchmarks/hijack.py --seeds 10 --noise-levels 0 0.1 0.3 --out results/hijack
    python benchmarks/hijack.py --experiments fsha --noise-levels 0 0.1 --epochs 3 \
        --defenses "cem-gmm-l16=--noise 0.1 --cem gmm --lambda 16 --cem-warmup 0"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deploy.processes import start_server
from edge_client.config import HIJACK_EXIT as DETECTED_EXIT



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=["fsha", "detect", "honest"],
                   choices=("fsha", "detect", "honest"))
    p.add_argument("--seeds", type=int, default=10, help="runs of `detect` and of `honest`")
    p.add_argument("--baseline-seeds", type=int, default=3, help="honest runs without the detector")
    p.add_argument("--noise-levels", nargs="*", type=float, default=[0.0, 0.1, 0.3],
                   help="`fsha`: one run per level, `--noise SIGMA` (0: the edge's defaults)")
    p.add_argument("--defenses", nargs="*", default=[], metavar="NAME=FLAGS",
                   help="`fsha`: one run more per defense, NAME=\"edge-client flags\" (e.g. cem-gmm=\"--noise 0.1 "
                        "--cem gmm --lambda 16 --cem-warmup 0\"); NAME names its report and its results entry")
    p.add_argument("--epochs", type=int, default=10, help="edge-client --epochs (its default: 10)")
    p.add_argument("--record-every", type=int, default=2, help="cloud-server --hijack-record-every")
    p.add_argument("--parallel", type=int, default=2, help="edge processes at once")
    p.add_argument("--detector", default="splitguard", choices=("splitguard", "alignment"),
                   help="edge-client --detect of the `detect` and `honest` runs")
    p.add_argument("--edge-flags", default="", metavar="FLAGS",
                   help="more edge-client flags for every run: other data than digits, e.g. \"--dataset "
                        "imagefolder --data-root DIR --max-steps 150\"")
    p.add_argument("--hijacker-flags", default="", metavar="FLAGS",
                   help="more flags for the hijacking cloud-server, after --public-data digits (which they may "
                        "override: \"--public-data imagefolder --public-root DIR\")")
    p.add_argument("--out", default="", help="keep the reports, scores and grids here (default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        args.defenses = _defenses(args.noise_levels, args.defenses)
    except ValueError as err:
        p.error(str(err))
    out = Path(args.out or tempfile.mkdtemp(prefix="hijack-"))
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"out": str(out), "epochs": args.epochs, "detector": args.detector}
    if "fsha" in args.experiments:
        result["fsha"] = _fsha(args, out / "fsha")
    if "detect" in args.experiments:
        result["detect"] = _detect(args, out / "detect")
    if "honest" in args.experiments:
        result["honest"] = _honest(args, out / "honest")
    print(json.dumps(result, indent=2))
    return 0


def _defenses(noise_levels: list[float], named: list[str]) -> dict[str, list[str]]:
    """The `fsha` runs: name -> edge-client flags, the noise levels' (`noise0.1`) then `--defenses`'s."""
    runs = {f"noise{noise:g}": ["--noise", str(noise)] if noise else [] for noise in noise_levels}
    for entry in named:
        name, sep, flags = entry.partition("=")
        if not sep or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"--defenses {entry!r}: expected NAME=FLAGS, NAME of letters, digits and ._+-")
        if name in runs:
            raise ValueError(f"--defenses {entry!r}: the name {name!r} is taken (a noise level's or given twice)")
        runs[name] = shlex.split(flags)
    return runs


def _hijacker(args: argparse.Namespace, folder: Path):
    return start_server("--hijack", "fsha", "--public-data", "digits", "--hijack-out", str(folder / "recon"),
                        "--hijack-record-every", str(args.record_every), "--threads", "1",
                        *shlex.split(args.hijacker_flags), fork=False)


def _edge(server: str, report: Path, seed: int, epochs: int, *flags: str) -> int:
    """One `edge-client` process; its exit status."""
    command = [sys.executable, "-m", "edge_client", "--server", server, "--seed", str(seed), "--epochs", str(epochs),
               "--job", report.stem, "--report", str(report), "--no-progress", "--threads", "1", *flags]
    with open(report.with_suffix(".log"), "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def _edges(args: argparse.Namespace, server, runs: list[tuple[Path, int, list[str]]]) -> list[int]:
    """The runs (report, seed, flags) against `server`, `args.parallel` at a time; then the server stops."""
    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            return list(pool.map(lambda run: _edge(server.address, run[0], run[1], args.epochs,
                                                   *shlex.split(args.edge_flags), *run[2]), runs))
    finally:
        server.stop()


def _score(args: argparse.Namespace, recon: Path, report: Path, out: Path) -> dict:
    """`attacker score --by-step` of one edge's session, on the edge's data (its --data-root and
    --image-size from --edge-flags: the scorer takes the dataset from the report, not where it is)."""
    edge = shlex.split(args.edge_flags)
    data = [a for flag, value in zip(edge, edge[1:]) if flag in ("--data-root", "--image-size") for a in (flag, value)]
    done = subprocess.run([sys.executable, "-m", "attacks", "score", "--recon", str(recon), "--edge-report",
                           str(report), "--by-step", "--out", str(out), *data], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fsha(args: argparse.Namespace, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    runs = [(folder / f"{name}.json", 0, flags) for name, flags in args.defenses.items()]
    codes = _edges(args, _hijacker(args, folder), runs)
    found = {}
    for (report, _, flags), code in zip(runs, codes):
        edge = json.loads(report.read_text())
        score = _score(args, folder / "recon", report, folder / f"{report.stem}-score")
        steps = [(row["step_id"], row["ssim"], row["psnr"], row["mse"]) for row in score["train_by_step"]]
        found[report.stem] = {"exit": code, "flags": flags, "test_accuracy": edge["test_accuracy"],
                              "steps": edge["steps"],
                              "cem_pull": edge.get("cem_pull"),  # how hard CEM pulled (README, report keys)
                              "ssim_by_step": [[s, round(v, 4)] for s, v, _, _ in steps],
                              "final": {"step_id": steps[-1][0], "ssim": steps[-1][1], "psnr": steps[-1][2],
                                        "mse": steps[-1][3]},
                              "best_ssim": max(v for _, v, _, _ in steps),
                              "first_step_ssim_0.8": next((s for s, v, _, _ in steps if v >= 0.8), None)}
    return found


def _detect(args: argparse.Namespace, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    runs = [(folder / f"seed{seed}.json", seed, ["--detect", args.detector]) for seed in range(args.seeds)]
    codes = _edges(args, _hijacker(args, folder), runs)
    rows = []
    for (report, seed, _), code in zip(runs, codes):
        edge = json.loads(report.read_text())
        detect = edge["detect"]
        score = _score(args, folder / "recon", report, folder / f"{report.stem}-score")
        by_step = score["train_by_step"]
        last = by_step[-1]
        rows.append({"seed": seed, "exit": code, "detected_at_step": detect["detected_at_step"],
                     "splitguard": detect["last_splitguard"], "label_alignment": detect["last_label_alignment"],
                     "first_label_alignment": (detect["checks"] or [{}])[0].get("label_alignment"),
                     "loss_grad_corr": detect["last_loss_grad_corr"], "attacker_step": last["step_id"],
                     "attacker_ssim_at_stop": last["ssim"],
                     "attacker_ssim_max": max(row["ssim"] for row in by_step)})
    stopped = [r for r in rows if r["exit"] == DETECTED_EXIT]
    return {"runs": rows, "stopped": len(stopped), "of": len(rows),
            "stopped_below_ssim_0.5": sum(r["attacker_ssim_at_stop"] < 0.5 for r in stopped),
            "stop_steps": sorted(r["detected_at_step"] for r in stopped)}


def _least(detect: dict, key: str) -> float | None:
    """The least value of `key` over the detector's checks (None: none; a NaN is null in the report)."""
    return min((c[key] for c in detect.get("checks", []) if c[key] is not None), default=None)


def _honest(args: argparse.Namespace, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    runs = [(folder / f"detect-seed{seed}.json", seed, ["--detect", args.detector]) for seed in range(args.seeds)]
    runs += [(folder / f"plain-seed{seed}.json", seed, []) for seed in range(args.baseline_seeds)]
    codes = _edges(args, start_server("--threads", "1", fork=False), runs)
    rows = []
    for (report, seed, flags), code in zip(runs, codes):
        edge = json.loads(report.read_text())
        detect = edge.get("detect", {})
        rows.append({"run": report.stem, "seed": seed, "detector": bool(flags), "exit": code,
                     "test_accuracy": edge.get("test_accuracy"), "detected_at_step": detect.get("detected_at_step"),
                     "min_splitguard": _least(detect, "splitguard"),
                     "min_label_alignment": _least(detect, "label_alignment"),
                     "label_alignment": detect.get("last_label_alignment"),
                     "loss_grad_corr": detect.get("last_loss_grad_corr")})
    with_detector = [r for r in rows if r["detector"]]
    plain = [r for r in rows if not r["detector"]]

    def mean_accuracy(group: list[dict]) -> float | None:
        values = [r["test_accuracy"] for r in group if r["test_accuracy"] is not None]
        return sum(values) / len(values) if values else None

    return {"runs": rows, "false_alarms": sum(r["exit"] == DETECTED_EXIT for r in with_detector),
            "of": len(with_detector), "accuracy_with_detector": mean_accuracy(with_detector),
            "accuracy_without_detector": mean_accuracy(plain)}


if __name__ == "__main__":
    sys.exit(main())
