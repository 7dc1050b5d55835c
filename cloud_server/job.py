"""A training job: one decoder and its optimizer, shared by every session that joins.

Transport-free on purpose: the gRPC servicer drives it over the wire, and the
single-process baseline drives it directly, so both run exactly the same math.

Exactly-once: each client numbers its steps 1, 2, 3, ...; the job remembers the last
step id it applied per client and refuses to apply one twice. A retry of the last step
gets the cached result back (so an edge whose response was lost still gets its
gradient), an older id is reported as a duplicate, and a gap is an error.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from splitnet.models import OptimSpec, SplitSpec, build, private_rng
from splitnet.schedule import LrSchedule


@dataclass
class StepOutcome:
    grad: torch.Tensor | None  # None for an old duplicate: nothing to apply on the edge
    loss: float
    correct: int
    duplicate: bool
    job_steps_applied: int
    lr: float = 0.0  # the rate the decoder stepped with (0 for a duplicate)


class StepOrderError(ValueError):
    """A step id skipped ahead: steps of one client must arrive in order."""


class NotFinite(ArithmeticError):
    """The loss, a gradient or the logits came out NaN or Inf, so the job refused to use them.

    Finite features can still overflow inside the decoder (a batch of 3e38 does), and one
    optimizer step on a NaN gradient would poison the decoder every client of the job shares.
    """


@dataclass
class _ClientState:
    last_step: int = 0
    last_outcome: StepOutcome | None = None


@dataclass
class Job:
    name: str
    spec: SplitSpec
    optim: OptimSpec
    device: str = "cpu"
    seed: int = 0  # the decoder starts from the same weights as a single-process model of this seed
    steps_applied: int = 0
    clients: dict[str, _ClientState] = field(default_factory=dict)
    # client id -> the principal that first opened it; checkpointed, so that a restart does not
    # hand a client id (and its step counter) to whoever re-opens it first
    owners: dict[str, str] = field(default_factory=dict)
    durable: dict[str, int] = field(default_factory=dict)  # client -> last step a written checkpoint holds
    # client -> its learning-rate schedule, in its own steps (clients' epochs differ in length); checkpointed
    schedules: dict[str, LrSchedule] = field(default_factory=dict)
    checkpoints_written: int = 0
    restored: bool = False  # built from a checkpoint (the session's `resumed`)
    active_at: float = field(default_factory=time.monotonic, repr=False)  # last step, inference or session
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        with private_rng(self.seed):  # other server threads keep their RNG state, and we ours
            split = build(self.spec)
        self.spec = split.spec
        self.feature_shape = split.feature_shape
        self.decoder = split.decoder.to(self.device)
        self.optimizer = self.optim.make(self.decoder.parameters())
        self._loss = nn.CrossEntropyLoss()

    def last_step(self, client_id: str) -> int:
        with self.lock:
            return self.clients.get(client_id, _ClientState()).last_step

    def set_schedule(self, client_id: str, schedule: LrSchedule) -> None:
        """The schedule a (re-)opening client declared: its later steps follow it."""
        with self.lock:
            self.schedules[client_id] = schedule
            self.active_at = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last step, inference or opened session: the server evicts a job idle too long."""
        return time.monotonic() - self.active_at

    def train_step(self, client_id: str, step_id: int, features: torch.Tensor, labels: torch.Tensor) -> StepOutcome:
        """Apply one step once: forward, backward, optimizer step; return dLoss/dfeatures."""
        with self.lock:
            self.active_at = time.monotonic()
            state = self.clients.setdefault(client_id, _ClientState())
            if step_id <= state.last_step:
                if step_id == state.last_step and state.last_outcome is not None:
                    cached = state.last_outcome
                    return StepOutcome(cached.grad, cached.loss, cached.correct, True, self.steps_applied, cached.lr)
                return StepOutcome(None, 0.0, 0, True, self.steps_applied)
            if step_id != state.last_step + 1:
                raise StepOrderError(f"step_id {step_id} skips ahead: the server expects {state.last_step + 1} "
                                     f"for client {client_id!r}")
            self.decoder.train()
            z = features.to(self.device).requires_grad_(True)
            y = labels.to(self.device)
            buffers = _copy_buffers(self.decoder)  # the forward pass updates batch-norm statistics
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.decoder(z)
            loss = self._loss(logits, y)
            loss.backward()
            lr = self.optim.lr * self.schedules.get(client_id, LrSchedule()).factor(step_id)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._refuse_non_finite(step_id, loss, z, buffers)
            self.optimizer.step()
            self.steps_applied += 1
            outcome = StepOutcome(z.grad.detach().cpu(), float(loss.detach()),
                                  int((logits.argmax(1) == y).sum()), False, self.steps_applied, lr)
            state.last_step, state.last_outcome = step_id, outcome
            return outcome

    def _refuse_non_finite(self, step_id: int, loss: torch.Tensor, z: torch.Tensor,
                           buffers: dict[str, torch.Tensor]) -> None:
        """Before the optimizer step: if the loss or any gradient is NaN / Inf, put the decoder's
        buffers back, drop the gradients and raise NotFinite. Weights and optimizer state are
        untouched, and the caller has not yet advanced the client's step counter."""
        grads = [z.grad, *(p.grad for p in self.decoder.parameters() if p.grad is not None)]
        if not torch.isfinite(loss):
            what = "loss"
        elif not all(bool(torch.isfinite(g).all()) for g in grads):
            what = "gradient"
        else:
            return
        self.optimizer.zero_grad(set_to_none=True)
        for name, value in self.decoder.named_buffers():
            value.copy_(buffers[name])
        raise NotFinite(f"step {step_id}: the {what} was not finite (NaN or Inf); the step was refused and the "
                        "decoder left unchanged")

    def infer(self, features: torch.Tensor) -> torch.Tensor:
        with self.lock, torch.no_grad():
            self.active_at = time.monotonic()
            self.decoder.eval()
            logits = self.decoder(features.to(self.device)).cpu()
        if not torch.isfinite(logits).all():
            raise NotFinite("the logits were not finite (NaN or Inf) for these features; refused")
        return logits

    # -- checkpoint state: plain tensors, numbers and strings, loadable with weights_only=True

    def state(self) -> dict:
        with self.lock:
            return {
                "name": self.name,
                "spec": self.spec.as_dict(),
                "optim": {"lr": self.optim.lr, "momentum": self.optim.momentum,
                          "weight_decay": self.optim.weight_decay},
                "seed": self.seed,
                "steps_applied": self.steps_applied,
                "client_last_step": {c: s.last_step for c, s in self.clients.items()},
                "client_schedule": {c: s.as_dict() for c, s in self.schedules.items()},
                "client_owner": dict(self.owners),
                "decoder": {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()},
                "optimizer": _clone(self.optimizer.state_dict()),
            }

    @classmethod
    def from_state(cls, state: dict, device: str = "cpu") -> "Job":
        job = cls(state["name"], SplitSpec.from_dict(state["spec"]), OptimSpec(**state["optim"]), device, state["seed"])
        job.decoder.load_state_dict(state["decoder"])
        job.optimizer.load_state_dict(state["optimizer"])
        job.steps_applied = state["steps_applied"]
        job.clients = {c: _ClientState(last) for c, last in state["client_last_step"].items()}
        # absent in checkpoints written before schedules: those clients ran at a constant rate
        job.schedules = {c: LrSchedule.from_dict(s) for c, s in state.get("client_schedule", {}).items()}
        job.durable = dict(state["client_last_step"])
        job.restored = True
        job.owners = dict(state.get("client_owner", {}))  # absent in checkpoints written before it was kept
        return job

    def mark_durable(self, state: dict) -> None:
        """Record that `state` (from `state()`) is now on disk."""
        with self.lock:
            self.durable.update(state["client_last_step"])
            self.checkpoints_written += 1


def _copy_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.named_buffers()}


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj
