"""The edge's JSON report and its one-screen summary (keys documented in README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

SUMMARY_KEYS = ("test_accuracy", "train_loss", "steps", "samples_per_second", "bytes_up_per_sample",
                "bytes_down_per_sample", "rtt_ms_p50", "rtt_ms_p99", "wall_seconds")


# Test accuracy this far below the last epoch's training accuracy is reported as a warning.
# On a small grey two-class set, seeds that generalised ended 0.05-0.25 below training
# accuracy; the failure this catches ended 0.725 below (docs/TRAINING.md, "Generalization gap").
GAP_WARNING = 0.3


def generalization(train_accuracy: float | None, test_accuracy: float) -> tuple[float | None, list[str]]:
    """`generalization_gap` (train - test accuracy; None without a trained epoch) and the report's
    warnings about it. Training accuracy is the last epoch's, measured on the batches as trained
    (augmented, batch-norm in training mode); test accuracy in evaluation mode."""
    if train_accuracy is None or not math.isfinite(test_accuracy):
        return None, []
    gap = train_accuracy - test_accuracy
    if gap <= GAP_WARNING:
        return gap, []
    return gap, [f"test accuracy {test_accuracy:.3f} is {gap:.3f} below training accuracy {train_accuracy:.3f} "
                 f"(more than {GAP_WARNING:g}): the model does not generalise; try another --seed, "
                 "--augment off or more data"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values (JSON null in the report)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def write(report: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(_jsonable(report), indent=2) + "\n")


def write_lines(rows: list[dict], path: str | Path) -> None:
    """One JSON object a line (a many-client run's per-client rows: readable by `jq`, pandas, ...)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(_jsonable(row)) + "\n" for row in rows))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def summary(report: dict) -> str:
    rows = [(k, report[k]) for k in SUMMARY_KEYS if k in report]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)
