"""Job checkpoints: written atomically on a step schedule and at shutdown, read at start.

A checkpoint holds only tensors, numbers and strings (see `Job.state`), so it loads with
`torch.load(weights_only=True)`: a checkpoint file can never run code. Each job has one
file; a write goes to a temporary name first and is renamed over the old one, so a kill
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import threading
from pathlib import Path

import torch

from cloud_server.job import Job

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | None, every_steps: int) -> None:
        self.directory = Path(directory) if directory else None
        self.every_steps = every_steps
        self._lock = threading.Lock()
        self._saved_at: dict[str, int] = {}
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, job_name: str) -> Path:
        assert self.directory is not None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_name)[:64]
        digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
        return self.directory / f"{safe}-{digest}.ckpt"

    def maybe_save(self, job: Job) -> None:
        if self.enabled and job.steps_applied - self._saved_at.get(job.name, 0) >= self.every_steps:
            self.save(job)

    def save(self, job: Job) -> None:
        if not self.enabled:
            return
        with self._lock:
            state = job.state()
            if self._saved_at.get(job.name) == state["steps_applied"] and job.checkpoints_written:
                return
            target = self.path(job.name)
            tmp = target.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, target)
            self._saved_at[job.name] = state["steps_applied"]
            job.mark_durable(state)
        log.debug("checkpoint %s at step %d", target.name, state["steps_applied"])

    def load_all(self, device: str) -> dict[str, Job]:
        jobs: dict[str, Job] = {}
        if not self.enabled:
            return jobs
        for path in sorted(self.directory.glob("*.ckpt")):  # type: ignore[union-attr]
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:  # weights_only met something other than plain data
                raise ValueError(f"checkpoint {path} holds objects, not only weights; refused, as loading it could "
                                 f"run code ({str(err).splitlines()[0]})") from None
            job = Job.from_state(state, device)
            jobs[job.name] = job
            self._saved_at[job.name] = job.steps_applied
            log.info("resumed job %r from %s at step %d", job.name, path.name, job.steps_applied)
        return jobs
