"""A sweep's results: what a point's row holds, the rows kept (`result.json`, `--results`), averaged
over seeds and written as `results.json` / `results.csv`."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import tempfile
from pathlib import Path

from deploy.experiments.config import NO_HIJACK, Point, SweepConfig
from deploy.experiments.gains import defense_gains
from deploy.link_profiles import DIRECT

METRICS = ("test_accuracy", "bytes_up_per_sample", "bytes_down_per_sample", "rtt_ms_p50", "samples_per_second",
           "intra_mse", "cem_pull",  # cem_pull: the last epoch's lambda * w_lr * |g_rob| / |g_task| (CEM rows)
           "seconds_per_epoch", "time_to_accuracy_s", "latency_ms_p50", "latency_ms_p99")
LATENCY_METRICS = ("latency_ms_p50", "latency_ms_p99")  # of the point's latency.json (edge-client --infer-only)
ATTACK_METRICS = ("mse", "ssim", "psnr")
# A detecting edge's figures (detected: averaged over seeds, the share of runs stopped), and a
# hijacking server's scores (runner._hijack_scores)
DETECT_METRICS = ("detected", "detected_at_step")
HIJACK_METRICS = ("hijack_ssim", "hijack_mse", "hijack_psnr", "hijack_ssim_max", "hijack_ssim_at_detection")
# A row's settings, for HParams (axes: the grid's other swept settings)
POINT_SETTINGS = ("cut", "bottleneck", "codec", "defense", "seed", "link", "hijack", "axes", "defense_settings")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in its folder: a reader (or a resumed sweep)
    sees the old file or the new one, never half of one, whenever the writer is killed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def time_to_accuracy(row: dict, target: float) -> float | None:
    """Training seconds until the end of the first epoch whose training accuracy (the cloud's count
    over the epoch's batches) reached `target`; None if none did. Training accuracy, because
    evaluating the test set after every epoch would send it through the link and the attacker's
    capture as well."""
    elapsed = 0.0
    for seconds, accuracy in zip(row["epoch_seconds"], row["epoch_train_accuracy"]):
        elapsed += seconds
        if accuracy >= target:
            return elapsed
    return None


def metric_names(config: SweepConfig) -> list[str]:
    """A row's measured numbers (the rest of it is the point's settings): a detector's and a hijacker's
    where some point has one."""
    return (list(METRICS) + [f"{m}_{k}" for m in config.scored for k in ATTACK_METRICS]
            + list(DETECT_METRICS if config.detects else ()) + list(HIJACK_METRICS if config.hijacked else ()))


def aggregate(config: SweepConfig, rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every numeric metric, one row per group of points alike in all but the seed."""
    numeric = metric_names(config)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if "epoch_seconds" in row:  # the current target (a point's result.json holds the one of its run)
            row = {**row, "time_to_accuracy_s": time_to_accuracy(row, config.target_accuracy)}
        groups.setdefault(row["group"], []).append(row)
    out = []
    for members in groups.values():
        first = members[0]
        agg: dict = {**{k: first[k] for k in ("cut", "bottleneck", "codec", "defense")},
                     "link": first.get("link", DIRECT), "hijack": first.get("hijack", NO_HIJACK)}
        axes = {k: v for k, v in first.get("axes", {}).items() if k != "bottleneck"}
        agg.update({**axes, "axes": " ".join(f"{k}={v}" for k, v in axes.items()), "seeds": len(members)})
        for key in numeric:
            values = [float(m[key]) for m in members if m.get(key) is not None]  # float: `detected` is a bool
            if values:
                agg[key] = statistics.fmean(values)
                agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        agg["grid"] = first.get(f"{config.attacks[0]}_grid") if config.attacks else None
        out.append(agg)
    return out


def write_results(config: SweepConfig, rows: list[dict], out: Path) -> list[dict]:
    table = aggregate(config, rows)
    gains = defense_gains(rows, config.scored)
    write_atomic(out / "results.json", json.dumps({"rows": table, "points": rows, "defense_gains": gains}, indent=2)
                 + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
    writer.writeheader()
    writer.writerows(table)
    write_atomic(out / "results.csv", text.getvalue())
    return table


def finished_rows(points: list[Point], out: Path, results: Path | None = None) -> list[dict]:
    """The rows of the points that have a result, in grid order: `out/points/KEY/result.json`, or
    else (a study resumed elsewhere from its kept results) `results/KEY.json`. A row's group over
    seeds is the config's (rows written before a two-phase point's group left out its base's seed
    hold another)."""
    rows = []
    for point in points:
        for path in (out / "points" / point.key / "result.json", *([results / f"{point.key}.json"] if results else [])):
            if path.exists():
                rows.append({**json.loads(path.read_text()), "group": point.identity(seed=False)})
                break
    return rows


def keep_results(rows: list[dict], results: Path) -> None:
    """Each finished point's row as `results/KEY.json`: settings, hash, metrics, histories, and the
    attackers' settings and loss curves; no images, no checkpoints (what a study keeps in version
    control, to resume elsewhere or rebuild its tables with --report-only)."""
    results.mkdir(parents=True, exist_ok=True)
    for row in rows:
        text = json.dumps(row, indent=2) + "\n"
        path = results / f"{row['key']}.json"
        if not path.exists() or path.read_text() != text:
            write_atomic(path, text)
