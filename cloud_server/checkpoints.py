"""Job checkpoints: written atomically on a step schedule, at eviction and at shutdown; checked at
start and read at each job's first OpenSession.

A checkpoint holds only tensors, numbers and strings (see `Job.state`), so it loads with
`torch.load(weights_only=True)`: a checkpoint file can never run code. Each job has one
file; a write goes to a temporary name first and is renamed over the old one, so a kill
mid-write leaves the previous checkpoint intact.

The file format (header, checksum, safe loading) is `splitnet.checkpoint_file`, shared
with the attacker that reads a decoder out of a checkpoint. On top of it, `check_state`
refuses data that does not fit a job (wrong keys, types or shapes, NaN / Inf, numbers out
of range) with the file's name and the reason.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import threading
from pathlib import Path

import torch

from cloud_server import bounds
from cloud_server.job import Job
from splitnet.checkpoint_file import CheckpointError, read, write
from splitnet.finite import all_finite
from splitnet.models import OptimSpec, SplitSpec
from splitnet.schedule import LrSchedule

log = logging.getLogger(__name__)

MAX_COUNT = 2**63 - 1  # step ids and counters

# key -> type of every field of `Job.state`
_FIELDS = {"name": str, "spec": dict, "optim": dict, "seed": int, "steps_applied": int, "client_last_step": dict,
           "client_owner": dict, "decoder": dict, "optimizer": dict}


def check_state(path: Path, state) -> None:
    """Refuse a state that is not a job's: missing keys, wrong types, NaN / Inf tensors, numbers out of range."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a job's state")
    for key, kind in _FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(path, f"'{key}' is missing or not a {kind.__name__}")
    for key in ("client_replies", "client_schedule"):  # optional: absent in older checkpoints
        if not isinstance(state.get(key, {}), dict):
            raise CheckpointError(path, f"'{key}' is not a dict")
    for part in ("decoder", "optimizer", "client_replies"):
        for key, value in _tensors(state.get(part, {}), part):
            if not all_finite([value]):
                raise CheckpointError(path, f"{key} holds NaN or Inf")
    _check_ranges(path, state)


def _check_ranges(path: Path, state: dict) -> None:
    """Refuse numbers of the right type but out of range, naming the field. A negative step count
    used to be resumed as it was, and then failed every Stats call (its fields are unsigned) and
    the job's OpenSession; a model or optimizer setting a peer could not have asked for (see
    `cloud_server.bounds`) would build a decoder nobody can train, or exhaust memory."""
    if not _count(state["steps_applied"]):
        raise CheckpointError(path, f"'steps_applied': {state['steps_applied']} must lie in [0, {MAX_COUNT}]")
    if not 0 <= state["seed"] < 2**64:  # a SessionSpec's seed is a uint64
        raise CheckpointError(path, f"'seed': {state['seed']} must lie in [0, 2^64)")
    for client, last in state["client_last_step"].items():
        if not (isinstance(client, str) and _count(last)):
            raise CheckpointError(path, f"'client_last_step' of client {client!r}: {last!r} is not a step id in "
                                        f"[0, {MAX_COUNT}]")
    if not all(isinstance(c, str) and isinstance(o, str) for c, o in state["client_owner"].items()):
        raise CheckpointError(path, "'client_owner' maps something other than client ids to principals")
    try:
        spec = SplitSpec.from_dict(state["spec"])
        bounds.check_model(spec.num_classes, spec.input_shape, spec.bottleneck)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"'spec': {err}") from None
    try:
        optim = OptimSpec(**state["optim"])
        bounds.check_optim(optim.lr, optim.momentum, optim.weight_decay)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"'optim': {err}") from None
    for client, schedule in state.get("client_schedule", {}).items():
        try:
            LrSchedule.from_dict(schedule)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(path, f"'client_schedule' of client {client!r}: {err}") from None
    for client, entries in state.get("client_replies", {}).items():
        for i, entry in enumerate(entries if isinstance(entries, list) else [None]):
            if not (isinstance(entry, dict) and _count(entry.get("step")) and _count(entry.get("correct"))
                    and all(isinstance(entry.get(k), float) and math.isfinite(entry[k]) for k in ("loss", "lr"))
                    and entry["lr"] >= 0):
                raise CheckpointError(path, f"'client_replies' of client {client!r}, entry {i}: its step, correct, "
                                            "loss or lr is missing or out of range")


def _count(value) -> bool:
    """An int (not a bool) that fits the unsigned and signed 64-bit fields it is sent and kept in."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _tensors(obj, prefix: str):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def load_job(path: Path, device: str) -> Job:
    """The job a checkpoint file holds, or CheckpointError naming the file and the reason."""
    state = read(path)
    check_state(path, state)
    try:
        return Job.from_state(state, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a shape that does not fit
        raise CheckpointError(path, f"does not fit the model it names ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200]})") from None



@functools.lru_cache(maxsize=4096)
def file_stem(job_name: str) -> str:
    """A file name for a job: its name is the peer's choice, so only safe characters of it are kept,
    and a digest of the whole name keeps two names that differ elsewhere apart. Cached: every
    training step names its job's log by it (0.04 ms a step to compute)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_name)[:64]
    return f"{safe}-{hashlib.sha256(job_name.encode()).hexdigest()[:8]}"

class Checkpointer:
    def __init__(self, directory: str | None, every_steps: int, skip_bad: bool = False) -> None:
        """`skip_bad`: at start, a checkpoint that cannot be resumed is logged and its job left
        out, instead of stopping the server (cloud-server --skip-bad-checkpoints)."""
        self.directory = Path(directory) if directory else None
        self.every_steps = every_steps
        self.skip_bad = skip_bad
        self._lock = threading.Lock()
        self._saved_at: dict[str, int] = {}
        self._found: dict[str, Path | None] = {}  # job -> its file as found at start (None: refused)
        # job -> steps applied and each client's last step, as last written: Stats lists jobs not loaded from these
        self.on_disk: dict[str, dict] = {}
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, job_name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{file_stem(job_name)}.ckpt"

    def maybe_save(self, job: Job) -> None:
        if self.enabled and job.steps_applied - self._saved_at.get(job.name, 0) >= self.every_steps:
            self.save(job)

    def save(self, job: Job) -> None:
        """Write `job`'s checkpoint, unless it never trained: such a decoder is its seed's initial
        weights, and a peer that opens many jobs would otherwise leave a file for each."""
        if not self.enabled or not job.steps_applied:
            return
        with self._lock:
            state = job.state()
            if self._saved_at.get(job.name) == state["steps_applied"] and job.checkpoints_written:
                return
            target = self.path(job.name)
            write(target, state)
            self._found[job.name] = target
            self._note(job.name, state)
            job.mark_durable(state)
        log.debug("checkpoint %s at step %d", target.name, state["steps_applied"])

    def load(self, job_name: str, device: str) -> Job | None:
        """The job from its checkpoint, or None if it has none (never trained, no checkpoint
        folder, or skipped by `check_all`); CheckpointError if the file cannot be resumed.
        Jobs are loaded on demand, at their first OpenSession after a start or an eviction."""
        path = self._found.get(job_name, self.path(job_name) if self.enabled else None)
        if path is None or not path.exists():
            return None
        job = load_job(path, device)
        if job.name != job_name:
            raise CheckpointError(path, f"holds job {job.name!r}, not {job_name!r}")
        self._saved_at[job.name] = job.steps_applied
        log.info("resumed job %r from %s at step %d", job.name, path.name, job.steps_applied)
        return job

    def check_all(self, device: str) -> None:
        """Check every file in the folder at start, one at a time, keeping none in memory (so a
        restart holds no more jobs than --max-jobs and --max-memory-mb allow), but noting what
        each holds for `load` and `on_disk`. A file that cannot be resumed, or two files that
        hold one job, raise CheckpointError; with `skip_bad` they are logged and the job left out."""
        if not self.enabled:
            return
        for path in sorted(self.directory.glob("*.ckpt")):  # type: ignore[union-attr]
            try:
                job = load_job(path, device)
            except CheckpointError as err:
                self._refuse(err)
                continue
            if job.name in self._found:
                self._refuse(CheckpointError(path, f"holds job {job.name!r}, as {self._found[job.name]} does: keep "
                                                   "one and move the other away"))
                self._found[job.name] = None  # skipping: neither claimant is trusted
                self.on_disk.pop(job.name, None)
                continue
            self._found[job.name] = path
            self._note(job.name, job.state())
        log.info("%d job checkpoint(s) found in %s; each is loaded at its job's first OpenSession",
                 len(self.on_disk), self.directory)

    def _note(self, name: str, state: dict) -> None:
        self._saved_at[name] = state["steps_applied"]
        self.on_disk[name] = {"steps_applied": state["steps_applied"],
                              "client_last_step": dict(state["client_last_step"])}

    def _refuse(self, err: CheckpointError) -> None:
        if not self.skip_bad:
            raise err
        log.error("%s; started without that job (--skip-bad-checkpoints)", err)
