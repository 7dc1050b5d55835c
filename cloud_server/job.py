"""A training job: one decoder and its optimizer, shared by every session that joins.

Transport-free on purpose: the gRPC servicer drives it over the wire, and the
single-process baseline drives it directly, so both run exactly the same math.

Exactly-once: each client numbers its steps 1, 2, 3, ...; the job remembers the last
step id it applied per client and refuses to apply one twice, and a gap is an error.

No update lost: a reply can be lost after its step was applied (a broken stream, or a
server killed between applying a step, or checkpointing it, and sending the reply), and
with pipelining several can. The job therefore keeps the outcome of every applied step
the edge has not acknowledged receiving (`TrainStep.received_step_id`), at most
MAX_KEPT_REPLIES per client, and checkpoints them with the decoder: a re-sent step that
was applied before gets its gradient back, so the edge applies every step the decoder
did. Only a step the edge acknowledged, or one older than what is kept, is answered as
a duplicate without a gradient. A session closed with its acknowledgement
(`CloseRequest.received_step_id`) leaves none behind: what exactly-once needs of an idle
client is its last step id (and owner and schedule), a few hundred bytes.

The U-shaped split (`SplitSpec.head_cut`) runs a step in two halves under one step id:
`forward_step` answers the middle's output and remembers the features, `backward_step`
takes dLoss/d(output) from the edge's head, trains the middle and answers dLoss/dfeatures.
Only the second half applies the step, so exactly-once is the vanilla bookkeeping. The first
half's forward leaves the batch-norm statistics as they were (the second runs it again with
gradients, on the same weights: the same output, statistics updated once); a second half
that comes with its features (re-sent after a reconnect) needs no first half.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from splitnet.finite import all_finite
from splitnet.models import OptimSpec, SplitSpec, build, private_rng
from splitnet.schedule import LrSchedule
from splitnet.wire import MAX_KEPT_REPLIES


@dataclass
class StepOutcome:
    grad: torch.Tensor | None  # None for a duplicate whose reply is no longer kept: nothing to apply
    loss: float
    correct: int
    duplicate: bool
    job_steps_applied: int
    lr: float = 0.0  # the rate the decoder stepped with (0 for a duplicate)
    output: torch.Tensor | None = None  # U-shaped split: the middle's output for the step's features


class NoForward(LookupError):
    """The second half of a U-shaped step came without features and its first half is not pending
    (the server restarted between the two): the edge re-sends the step with both."""


class StepOrderError(ValueError):
    """A step id skipped ahead: steps of one client must arrive in order."""


class Retired(RuntimeError):
    """The job left memory (evicted after its checkpoint) while this caller still held it."""


class NotFinite(ArithmeticError):
    """The loss, a gradient or the logits came out NaN or Inf, so the job refused to use them.

    Finite features can still overflow inside the decoder (a batch of 3e38 does), and one
    optimizer step on a NaN gradient would poison the decoder every client of the job shares.
    """


@dataclass
class _ClientState:
    last_step: int = 0
    # step id -> outcome, for applied steps the edge has not acknowledged (oldest first)
    replies: OrderedDict[int, StepOutcome] = field(default_factory=OrderedDict)
    # U-shaped split: the step id and features of a first half awaiting its second (not checkpointed)
    pending: tuple[int, torch.Tensor] | None = None

    def keep(self, step_id: int, outcome: StepOutcome, received: int) -> None:
        self.replies[step_id] = outcome
        self.forget(received)
        while len(self.replies) > MAX_KEPT_REPLIES:
            self.replies.popitem(last=False)

    def forget(self, received: int) -> None:
        """Drop the replies up to the step the edge says it has received."""
        while self.replies and next(iter(self.replies)) <= received:
            self.replies.popitem(last=False)


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
    retired: bool = False  # evicted: a step that still reaches this object must not be applied
    active_at: float = field(default_factory=time.monotonic, repr=False)  # last step, inference or session
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        with private_rng(self.seed):  # other server threads keep their RNG state, and we ours
            split = build(self.spec)
        self.spec = split.spec
        self.feature_shape = split.feature_shape
        self.output_shape = split.output_shape
        self.decoder = split.decoder.to(self.device)
        self.optimizer = self.optim.make(self.decoder.parameters())
        self._loss = nn.CrossEntropyLoss()

    def adopt_decoder(self, source: "Job") -> None:
        """Take `source`'s decoder weights and batch-norm statistics (a new job continuing a trained
        one); the optimizer's state stays fresh, as the edge's does when it loads an encoder."""
        with source.lock:
            weights = {k: v.detach().clone() for k, v in source.decoder.state_dict().items()}
        with self.lock:
            self.decoder.load_state_dict(weights)

    def last_step(self, client_id: str) -> int:
        with self.lock:
            return self.clients.get(client_id, _ClientState()).last_step

    def forget_replies(self, client_id: str, received: int) -> None:
        """The client closed its session having received the replies up to `received`: they
        are no longer needed for a re-send. An idle client then costs its counters, not a
        cached gradient per client (thousands of virtual clients share one job)."""
        with self.lock:
            state = self.clients.get(client_id)
            if state is not None:
                state.forget(received)

    def set_schedule(self, client_id: str, schedule: LrSchedule) -> None:
        """The schedule a (re-)opening client declared: its later steps follow it."""
        with self.lock:
            self.schedules[client_id] = schedule
            self.active_at = time.monotonic()

    def retire(self) -> None:
        """From now on every step is refused. Called before the eviction checkpoint, under the
        job's lock, so a step still in flight either lands before the checkpoint (and is in
        it) or is refused (and the edge replays it to the reloaded job): none is lost."""
        with self.lock:
            self.retired = True

    def idle_for(self) -> float:
        """Seconds since the last step, inference or opened session: the server evicts a job idle too long."""
        return time.monotonic() - self.active_at

    def train_step(self, client_id: str, step_id: int, features: torch.Tensor, labels: torch.Tensor,
                   received: int = 0) -> StepOutcome:
        """Apply one step once: forward, backward, optimizer step; return dLoss/dfeatures.
        `received`: the highest step id whose reply the client has (its acknowledgement)."""
        with self.lock:
            state, duplicate = self._client_step(client_id, step_id, received)
            if duplicate is not None:
                return duplicate
            grad, loss, correct, lr = self._learn(client_id, step_id, features, labels)
            return self._applied(state, step_id, StepOutcome(grad, loss, correct, False, 0, lr), received)

    def forward_step(self, client_id: str, step_id: int, features: torch.Tensor, received: int = 0) -> StepOutcome:
        """A U-shaped step's first half: the middle's output for `features` (no update), or, for a step
        applied before, its kept outcome (gradient and output) as a duplicate."""
        with self.lock:
            state, duplicate = self._client_step(client_id, step_id, received)
            if duplicate is not None:
                return duplicate
            buffers = _copy_buffers(self.decoder)
            self.decoder.train()
            with torch.no_grad():
                output = self.decoder(features.to(self.device)).cpu()
            _restore_buffers(self.decoder, buffers)
            if not all_finite([output]):
                raise NotFinite(f"step {step_id}: the middle's output was not finite (NaN or Inf); refused")
            state.pending = (step_id, features)
            return StepOutcome(None, 0.0, 0, False, self.steps_applied, output=output)

    def backward_step(self, client_id: str, step_id: int, output_grad: torch.Tensor,
                      features: torch.Tensor | None = None, received: int = 0) -> StepOutcome:
        """A U-shaped step's second half: train the middle with dLoss/d(output) from the edge and return
        dLoss/dfeatures. `features`: the step's, re-sent (else its first half's). ValueError where
        `output_grad` is not one row per example; NoForward where there are no features to use."""
        with self.lock:
            state, duplicate = self._client_step(client_id, step_id, received)
            if duplicate is not None:
                return duplicate
            if features is None:
                if state.pending is None or state.pending[0] != step_id:
                    raise NoForward(f"step {step_id}: its first half is not pending on this server (it restarted?); "
                                    "re-send the step with its features")
                features = state.pending[1]
            if output_grad.shape[0] != features.shape[0]:
                raise ValueError(f"output_grad: {output_grad.shape[0]} rows for a batch of {features.shape[0]}")
            grad, output, lr = self._learn_middle(client_id, step_id, features, output_grad)
            state.pending = None
            # the output is kept for a re-send of the first half; the edge has it, so it does not go back
            return replace(self._applied(state, step_id, StepOutcome(grad, 0.0, 0, False, 0, lr, output), received),
                           output=None)

    def _client_step(self, client_id: str, step_id: int, received: int) -> tuple[_ClientState, StepOutcome | None]:
        """Under the lock: the client's state and, for a step applied before, the duplicate's outcome
        (its kept reply, or none); Retired, or StepOrderError for a step that skips ahead."""
        if self.retired:
            raise Retired(f"job {self.name!r} was moved out of memory (idle); re-open the session to load it")
        self.active_at = time.monotonic()
        state = self.clients.setdefault(client_id, _ClientState())
        if step_id <= state.last_step:
            state.forget(received)
            kept = state.replies.get(step_id)
            if kept is not None:
                return state, replace(kept, duplicate=True, job_steps_applied=self.steps_applied)
            return state, StepOutcome(None, 0.0, 0, True, self.steps_applied)
        if step_id != state.last_step + 1:
            raise StepOrderError(f"step_id {step_id} skips ahead: the server expects {state.last_step + 1} "
                                 f"for client {client_id!r}")
        return state, None

    def _applied(self, state: _ClientState, step_id: int, outcome: StepOutcome, received: int) -> StepOutcome:
        """Under the lock, once a new step's math is done: count it and keep its reply."""
        self.steps_applied += 1
        outcome = replace(outcome, job_steps_applied=self.steps_applied)
        state.last_step = step_id
        state.keep(step_id, outcome, received)
        return outcome

    def _learn_middle(self, client_id: str, step_id: int, features: torch.Tensor,
                      output_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A U-shaped step's math: backpropagate the edge's dLoss/d(output) through the middle and step;
        return (dLoss/dfeatures, the output, lr)."""
        self.decoder.train()
        z = features.to(self.device).requires_grad_(True)
        buffers = _copy_buffers(self.decoder)
        self.optimizer.zero_grad(set_to_none=True)
        output = self.decoder(z)
        output.backward(output_grad.to(self.device))
        lr = self._set_lr(client_id, step_id)
        self._refuse_non_finite(step_id, output.detach(), z, buffers, "middle's output")
        self.optimizer.step()
        return z.grad.detach().cpu(), output.detach().cpu(), lr

    def _set_lr(self, client_id: str, step_id: int) -> float:
        lr = self.optim.lr * self.schedules.get(client_id, LrSchedule()).factor(step_id)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _learn(self, client_id: str, step_id: int, features: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, float, int, float]:
        """The step's math, under the job's lock, once the step is known to be new: train the decoder
        on the batch and return (dLoss/dfeatures, loss, correct, lr). A subclass that answers with
        other gradients (`cloud_server.hijack`) replaces this and keeps the exactly-once bookkeeping."""
        self.decoder.train()
        z = features.to(self.device).requires_grad_(True)
        y = labels.to(self.device)
        buffers = _copy_buffers(self.decoder)  # the forward pass updates batch-norm statistics
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.decoder(z)
        loss = self._loss(logits, y)
        loss.backward()
        lr = self._set_lr(client_id, step_id)
        self._refuse_non_finite(step_id, loss, z, buffers)
        self.optimizer.step()
        return (z.grad.detach().cpu(), float(loss.detach()), int((logits.argmax(1) == y).sum()), lr)

    def _refuse_non_finite(self, step_id: int, loss: torch.Tensor, z: torch.Tensor,
                           buffers: dict[str, torch.Tensor], loss_name: str = "loss") -> None:
        """Before the optimizer step: if the loss (`loss_name`) or any gradient is NaN / Inf, put the
        decoder's buffers back, drop the gradients and raise NotFinite. Weights and optimizer state are
        untouched, and the caller has not yet advanced the client's step counter."""
        grads = [z.grad, *(p.grad for p in self.decoder.parameters() if p.grad is not None)]
        if not all_finite([loss]):
            what = loss_name
        elif not all_finite(grads):
            what = "gradient"
        else:
            return
        self.optimizer.zero_grad(set_to_none=True)
        _restore_buffers(self.decoder, buffers)
        raise NotFinite(f"step {step_id}: the {what} was not finite (NaN or Inf); the step was refused and the "
                        "decoder left unchanged")

    def infer(self, features: torch.Tensor) -> torch.Tensor:
        with self.lock, torch.no_grad():
            self.active_at = time.monotonic()
            self.decoder.eval()
            logits = self.decoder(features.to(self.device)).cpu()
        if not all_finite([logits]):
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
                "client_replies": {c: [{"step": step, "grad": o.grad, "loss": o.loss, "correct": o.correct,
                                        "lr": o.lr, **({"output": o.output} if o.output is not None else {})}
                                       for step, o in s.replies.items()]
                                   for c, s in self.clients.items() if s.replies},
                "decoder": {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()},
                "optimizer": _clone(self.optimizer.state_dict()),
            }

    @classmethod
    def from_state(cls, state: dict, device: str = "cpu") -> "Job":
        job = cls(state["name"], SplitSpec.from_dict(state["spec"]), OptimSpec(**state["optim"]), device, state["seed"])
        job.decoder.load_state_dict(state["decoder"])
        job.optimizer.load_state_dict(state["optimizer"])
        job.steps_applied = state["steps_applied"]
        replies = state.get("client_replies", {})  # absent in checkpoints written before replies were kept
        job.clients = {c: _ClientState(last, _kept_replies(replies.get(c, []), last, tuple(job.feature_shape),
                                                           tuple(job.output_shape)))
                       for c, last in state["client_last_step"].items()}
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


def _kept_replies(entries: list, last_step: int, feature_shape: tuple,
                  output_shape: tuple) -> OrderedDict[int, StepOutcome]:
    """A client's kept replies as checkpointed; ValueError if they do not fit its steps or the
    job's features or middle output (the edge would fail on such a tensor, not the server)."""
    replies: OrderedDict[int, StepOutcome] = OrderedDict()
    previous = 0
    for entry in entries[-MAX_KEPT_REPLIES:]:
        step = entry["step"]
        if not (isinstance(step, int) and previous < step <= last_step):
            raise ValueError(f"kept reply of step {step!r} is out of order or after the last step {last_step}")
        previous = step
        grad, output = entry["grad"], entry.get("output")
        for name, value, shape in (("gradient", grad, feature_shape), ("output", output, output_shape)):
            if (value is not None or name == "gradient") and not _batch_of(value, shape):
                raise ValueError(f"kept reply of step {step}: its {name} is not a float tensor of shape "
                                 f"[batch, {', '.join(map(str, shape))}]")
        replies[step] = StepOutcome(grad, float(entry["loss"]), int(entry["correct"]), False, 0,
                                    float(entry["lr"]), output)
    return replies


def _batch_of(value, shape: tuple) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == len(shape) + 1
            and tuple(value.shape[1:]) == shape)


def _copy_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.named_buffers()}


def _restore_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in module.named_buffers():
        value.copy_(buffers[name])


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj
