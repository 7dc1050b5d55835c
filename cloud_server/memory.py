"""What a job will cost in memory, estimated before anything is allocated, and the budgets it must fit.

A SessionSpec decides how large a decoder the server builds: within the bounds the
servicer checks, cnn cut conv1 on a 1x1024x1024 input with a 128-channel bottleneck takes
seconds and more than a gigabyte just to build. So a new job is estimated first and
refused with RESOURCE_EXHAUSTED if it does not fit; nothing real is allocated for it.

The estimate builds the split model on torch's `meta` device (shapes only, no storage,
milliseconds) and counts, in float32 bytes:

- every decoder parameter three times (weights, gradients, SGD momentum) and its buffers once;
- the activations of a batch of `ESTIMATE_BATCH` samples, twice (each kept for the backward
  pass, and a gradient of the same size): the features at the cut and the output of every
  decoder layer.

It is deliberately simple and errs high (in-place layers count as new tensors). A batch
larger than `ESTIMATE_BATCH` costs more at step time; its size is bounded separately by
`--max-message-mb`.
"""

from __future__ import annotations

import math
import threading

import torch

from splitnet.models import SplitSpec, build, private_rng

ESTIMATE_BATCH = 64  # the edge's default --batch-size
_FLOAT_BYTES = 4
MB = 2**20


class OverBudget(Exception):
    """A new job does not fit; the message names the estimate, the budget and its flag."""


def estimate_bytes(spec: SplitSpec) -> int:
    """The job's memory as described in the module docstring. RuntimeError if the input is too
    small for the model (as building the real one would raise)."""
    with torch.device("meta"), private_rng():
        split = build(spec)
        decoder = split.decoder
        weights = sum(p.numel() for p in decoder.parameters())
        buffers = sum(b.numel() for b in decoder.buffers())
        outputs: list[int] = [math.prod(split.feature_shape)]
        hooks = [m.register_forward_hook(lambda _m, _in, out: outputs.append(out[0].numel()))
                 for m in decoder.modules() if not list(m.children())]
        with torch.no_grad():
            decoder(torch.zeros(1, *split.feature_shape))
        for hook in hooks:
            hook.remove()
    activations = 2 * ESTIMATE_BATCH * sum(outputs)
    return _FLOAT_BYTES * (3 * weights + buffers + activations)


def warm_up() -> None:
    """The first meta-device forward imports torch's meta kernels (about 1.5 s): pay it when the
    server starts, not in the first OpenSession."""
    estimate_bytes(SplitSpec())


class JobBudget:
    """Holds each live or being-built job's estimate against `--max-jobs`, `--job-memory-mb`
    and `--max-memory-mb`. A job is held from before it is built until it is dropped, so
    jobs built at the same time cannot overshoot the total together."""

    def __init__(self, max_jobs: int, job_mb: float, total_mb: float) -> None:
        self.max_jobs, self.job_mb, self.total_mb = max_jobs, job_mb, total_mb
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # job name -> estimated bytes

    @property
    def held_mb(self) -> float:
        with self._lock:
            return sum(self._held.values()) / MB

    def reserve(self, name: str, spec: SplitSpec) -> None:
        """Hold a new job's estimate, or raise OverBudget; RuntimeError as `estimate_bytes`."""
        nbytes = estimate_bytes(spec)
        what = (f"input_shape {list(spec.input_shape)}, bottleneck {spec.bottleneck}, width {spec.width}: "
                f"job {name[:64]!r} ({spec.arch} cut {spec.cut or 'default'}) needs an estimated "
                f"{nbytes / MB:,.1f} MiB")
        if nbytes > self.job_mb * MB:
            raise OverBudget(f"{what}, over the per-job budget of {self.job_mb:g} MiB (cloud-server "
                             "--job-memory-mb); use a smaller input, cut, bottleneck or width")
        with self._lock:
            if len(self._held) >= self.max_jobs:
                raise OverBudget(f"job: the server already holds {len(self._held)} jobs; join one of them or "
                                 "raise cloud-server --max-jobs")
            held = sum(self._held.values())
            if held + nbytes > self.total_mb * MB:
                raise OverBudget(f"{what}, but the live jobs already hold {held / MB:,.1f} of the "
                                 f"{self.total_mb:g} MiB all jobs may use (cloud-server --max-memory-mb)")
            self._held[name] = nbytes

    def release(self, name: str) -> None:
        with self._lock:
            self._held.pop(name, None)
