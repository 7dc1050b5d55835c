"""TensorBoard event files for `--log-dir`: the one place the project writes them.

A run is a folder of event files; `tensorboard --logdir DIR` shows every run under DIR
side by side. The numbers written are the ones the JSON reports already hold (the edge's
per-epoch history and running counters, the server's per-job counts, the attack's loss
per epoch, a sweep point's row), under tag names grouped by what they measure, so a
plot and a report never disagree. With no log dir a `Tracker` writes nothing and
imports nothing: tensorboard is an extra (`track`), and an edge device need not have it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from pathlib import Path

# Edge history / counters key -> scalar tag (the report's names, grouped for TensorBoard's sections).
EDGE_EPOCH_TAGS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "lr": "train/lr",
                   "seconds": "train/epoch_seconds", "samples_per_second": "train/samples_per_second"}
EDGE_COUNTER_TAGS = {"bytes_up_per_sample": "comm/bytes_up_per_sample",
                     "bytes_down_per_sample": "comm/bytes_down_per_sample",
                     "rtt_ms_p50": "comm/rtt_ms_p50", "rtt_ms_p99": "comm/rtt_ms_p99",
                     "reconnects": "comm/reconnects"}


def require() -> None:
    """Fail now, with the 'track' extra named (`cli_util.names_missing_extra`), where event files
    would be written later in another thread, process or Ray actor."""
    import torch.utils.tensorboard  # noqa: F401


def prepared(log_dir: str) -> str:
    """A command's `--log-dir` as it hands it on: absolute (its Ray actors and child processes run
    in other folders), with the extra checked at once (`require`); "" stays "" (no tracking)."""
    if not log_dir:
        return ""
    require()
    return str(Path(log_dir).resolve())


class Tracker:
    """A run's event files, or nothing at all when `log_dir` is empty."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = str(log_dir or "")
        self._writer = None
        if self.log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, object], tags: Mapping[str, str] | None = None) -> None:
        """Write the finite numbers of `values` at `step`, renamed by `tags` (only those keys) if given."""
        if self._writer is None:
            return
        for key, value in values.items():
            tag = key if tags is None else tags.get(key)
            if tag and _is_number(value) and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def edge_epoch(self, record: Mapping[str, object], counters: Mapping[str, object]) -> None:
        """One epoch of an edge client: its history record and the counters as of its end."""
        step = int(record["epoch"])
        self.scalars(step, record, {key: epoch_tag(key) for key in record if key != "epoch"})
        self.scalars(step, counters, EDGE_COUNTER_TAGS)
        self.flush()  # an epoch is seconds to hours: show it now, not at the writer's next timed flush

    def hparams(self, settings: Mapping[str, object], metrics: Mapping[str, object]) -> None:
        """This run's settings (str, number, bool) and final metrics for TensorBoard's HParams
        table, one row per run; each metric is also scalar `hparams/NAME`, which the table reads.

        Written into the run's own folder, beside its scalars: SummaryWriter.add_hparams would
        open a sub-run of its own, and a sweep point would show as two runs. The experiment
        summary written with it names the table's columns: without one TensorBoard makes every
        scalar of every run a metric column and shows the first five alphabetically (attack/,
        cem/), hiding the sweep's own metrics. TensorBoard reads one run's summary for all, so
        every run of a log dir must name the same settings and metrics (a sweep's points do),
        a metric this run lacks (None: CEM's pull without CEM) included.
        """
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        tags = {f"hparams/{k}": v for k, v in metrics.items()}
        for summary in hparams(dict(settings), tags):  # only the metrics' names go into these summaries
            self._writer.file_writer.add_summary(summary)
        self.scalars(0, tags)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# History key prefix -> section of the defenses that report under a prefix of their own.
DEFENSE_SECTIONS = {"adv_": "adversary/", "prune_": "prune/"}


def epoch_tag(key: str) -> str:
    """The tag of an edge history key: the rest of a record past the training figures is a defense's
    diagnostics, attacker-aware training's and pruning's by their prefix (`adv_mse` -> `adversary/mse`),
    the others CEM's (`cem_pull` -> `cem/pull`, `soft_gate_mean` -> `cem/soft_gate`), whichever the
    surrogate reports."""
    section = next((name + key.removeprefix(prefix) for prefix, name in DEFENSE_SECTIONS.items()
                    if key.startswith(prefix)), None)
    return EDGE_EPOCH_TAGS.get(key) or section or "cem/" + key.removeprefix("cem_").removesuffix("_mean")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_settings(settings: Mapping[str, object]) -> dict[str, object]:
    """Settings as HParams values (str, number, bool): a nested table's become `table.key`
    (a defense's settings), unset ones (None) and lists are left out."""
    out: dict[str, object] = {}
    for key, value in settings.items():
        for name, item in (value.items() if isinstance(value, Mapping) else [("", value)]):
            if isinstance(item, (str, int, float, bool)):
                out[f"{key}.{name}" if name else key] = item
    return out


def write_point(log_dir: str | Path, run: str, settings: Mapping[str, object], metrics: Mapping[str, object]) -> None:
    """A sweep point as run `run` under `log_dir`, a row of the HParams table."""
    tracker = Tracker(Path(log_dir) / run)
    try:
        tracker.hparams(flat_settings(settings), metrics)
    finally:
        tracker.close()


class JobTrackers:
    """The cloud server's side: one run per job (`job-NAME`), its decoder's loss and batch
    accuracy at every step it applies, numbered by the job's step count (all clients'
    steps together), so a job shared by several clients is one curve."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = str(log_dir or "")
        self._runs: dict[str, Tracker] = {}
        self._lock = threading.Lock()
        if self.log_dir:
            require()  # at start-up, not as an error inside the first training step

    def step(self, run: str, job_steps: int, loss: float, accuracy: float) -> None:
        """`run`: the job's folder name (`cloud_server.checkpoints.file_stem`: a job name is the peer's
        choice, and must not lead a path out of the log dir)."""
        if not self.log_dir:
            return
        with self._lock:
            tracker = self._runs.get(run)
            if tracker is None:
                tracker = self._runs[run] = Tracker(Path(self.log_dir) / f"job-{run}")
        tracker.scalars(job_steps, {"server/loss": loss, "server/accuracy": accuracy})

    def close(self) -> None:
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        for tracker in runs:
            tracker.close()
