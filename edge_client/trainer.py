"""Train the encoder through a (remote) decoder, then evaluate through it; build the report.

One step: z = F_e(x); z' = obfuscate(z), its pruned channels zeroed; send z' (the kept
channels) and y; the cloud returns dL/dz'; the encoder backpropagates it (plus NoPeek, the
simulated attacker's penalty and, through the two-phase merge, CEM) and steps.

The U-shaped split (`EdgeConfig.u_shaped`): the cloud answers the first half of a step with
its middle's output; the edge runs its head and the loss on it, sends dLoss/d(output) up (through
its label defense) and gets dL/dz' back as above. Labels never leave the edge; the head steps
with the encoder, in one optimizer.

Pipelining (`ConnectionConfig.pipeline = k`): up to k further steps are sent before the
gradient of the oldest returns, so the edge's encoder work overlaps the transport and the
cloud's decoder work. A gradient is then applied up to k optimizer steps late (bounded
staleness). Each in-flight step's forward runs on a snapshot of the weights (weight
stashing), so its backward uses the weights its features were computed with even though
the optimizer has moved on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from torch.func import functional_call
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from edge_client import state as state_file
from edge_client.adversary_hook import AdversaryHook
from edge_client.cem_hook import CemHook
from edge_client.config import EdgeConfig
from edge_client.defense import nopeek_loss
from edge_client.detect import Detector, HijackDetected
from edge_client.label_defense import LabelDefense
from edge_client.report import generalization, percentile
from splitnet import data, encoder_file, models
from splitnet.cloud_api import Cloud, NotDurable, StepReply
from splitnet.obfuscation import Obfuscation
from splitnet.schedule import LrSchedule
from splitnet.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    z_sent: torch.Tensor
    step_id: int
    epoch: int
    fake: bool = False  # a detector's batch with wrong labels (edge_client.detect): not trained on, not tallied
    reply: StepReply | None = None  # a U-shaped step's, with the edge's loss and correct: collected already
    head_grads: tuple[torch.Tensor, ...] = ()  # a U-shaped step's: its head parameters' gradients


class StepsLost(RuntimeError):
    """The server has fewer of this client's steps than its state says it sent: it lost some (a
    restart without the checkpoint that held them), and renumbering would hide it."""


# Fewer training steps an epoch than this: the encoder's batch-norm statistics are measured afresh
# on the training set before evaluation (`run`). With momentum 0.1 a running statistic holds 90%
# of its weight in the last 22 steps and 99% in the last 44, so from about 50 steps an epoch it
# describes the last epoch's weights, which a schedule's end barely moves.
SHORT_EPOCH_STEPS = 50

# The cloud's running counters that belong to the client, carried from turn to turn.
CLOUD_COUNTERS = ("bytes_up", "bytes_down", "reconnects", "replayed_steps", "rtt_ms")


@dataclass
class TrainerState:
    """What an `EdgeTrainer` needs to carry on where another one stopped, in another process.

    A virtual client (`deploy.sim.virtual`) is this between its turns: the worker that
    runs its next turn builds a trainer for it and restores this; an edge-client's state file
    (`edge_client.state`) holds it as a dict. The data position and the
    random generators are in it, so a turn that is run again (its worker died) sends the
    same batches, with the same noise, under the same step ids. Plain tensors, numbers,
    lists and dicts: it travels through Ray and saves with `torch.save`, and loads with
    `weights_only=True`.
    """

    step_id: int
    first_step_id: int
    steps: int
    samples: int
    train_seconds: float
    duplicates: int
    resent: int
    lr: float
    lr_mismatches: int
    durable_step_id: int
    history: list[dict]
    passes: int  # passes over the training data begun
    pass_offset: int  # batches taken from the current pass; 0: none is open
    loader_rng: torch.Tensor  # the shuffling generator before the current pass was drawn (or now, if none is open)
    noise_rng: torch.Tensor  # the obfuscation's generator
    cloud: dict  # CLOUD_COUNTERS
    # Where the client keeps its own encoder (parallel mode): its weights and optimizer state.
    # None where every turn starts from an encoder handed in (sequential, splitfed).
    encoder: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    # The simulated attacker and the channel gate (AdversaryHook.state): the device's own, so every
    # client carries its own from turn to turn. None where neither defense is on.
    adversary: dict | None = None
    # The U-shaped split's label defense's generator (its head travels in `encoder`, as "head.*").
    label_rng: torch.Tensor | None = None


def encoder_momentum(momentum: float, pipeline: int) -> float:
    """Momentum for an encoder whose gradients arrive `pipeline` steps late.

    Asynchrony acts as implicit momentum of about 1 - 1/(k+1) for staleness k
    (Mitliagkas et al., "Asynchrony begets momentum", 2016); stacking the usual 0.9 on
    top of it made the weights oscillate (digits, 3 epochs, k=3: test accuracy 0.12,
    against 0.90 with the explicit momentum lowered), so it is reduced by that amount.
    """
    return max(0.0, momentum - pipeline / (pipeline + 1)) if pipeline else momentum


class EdgeTrainer:
    """An edge client's training life: open a session, train epochs, evaluate, report.

    Ray actors drive it epoch by epoch and move encoder weights in and out of it
    (sequential split learning, SplitFed); `run` drives it start to finish.
    """

    def __init__(self, config: EdgeConfig, cloud: Cloud, splits: data.Splits | None = None,
                 train_set: Dataset | None = None) -> None:
        self.config, self.cloud = config, cloud
        self.splits = splits or data.load(config.data)
        self.train_set = train_set if train_set is not None else self.splits.train
        torch.manual_seed(config.seed)
        self.split = models.build(models.SplitSpec(config.arch, config.cut, self.splits.num_classes,
                                                   self.splits.input_shape, config.bottleneck, config.width,
                                                   config.split_head_cut()))
        if config.init_from:  # a continuation: the trained encoder's weights, batch-norm statistics included
            self.split.encoder.load_state_dict(encoder_file.read_fitting(config.init_from, self.split.spec)
                                               .split.encoder.state_dict())
        self.encoder = self.split.encoder.to(config.device)
        self.head = self.split.head.to(config.device) if self.split.head is not None else None
        self.label_defense = LabelDefense(config.label_defense, config.label_defense_strength)
        if config.label_defense == "marvell" and self.splits.num_classes != 2:
            raise ValueError(f"--label-defense marvell protects a binary task's labels; this dataset has "
                             f"{self.splits.num_classes} classes (use gaussian or max_norm)")
        self.label_rng = torch.Generator().manual_seed(config.seed + 3)
        self.augment = (data.augment_by_default(self.train_set) if config.augment == "auto"
                        else config.augment == "on")
        self.augmented = data.Augmented(self.train_set, config.seed) if self.augment else None
        self.loader = data.training_loader(self.augmented or self.train_set, config.batch_size, config.seed)
        self._pass: Iterator | None = None  # the open pass over the data: an epoch of epoch_steps can end within one
        self._pass_rng = self.loader.generator.get_state()
        self.passes = self.pass_offset = 0
        schedule = LrSchedule.parse(config.lr_schedule, config.epochs, config.epoch_steps or len(self.loader),
                                    config.warmup_epochs)
        self.optim = models.OptimSpec(config.lr, config.momentum, config.weight_decay, schedule)
        self.optimizer = models.OptimSpec(config.lr, encoder_momentum(config.momentum, config.connection.pipeline),
                                          config.weight_decay).make(self._edge_parameters())
        self.obfuscation = Obfuscation(config.defense.obfuscation,
                                       generator=torch.Generator().manual_seed(config.seed + 1))
        self.cem = CemHook.create(config, self.encoder, self.optimizer, self.split, len(self.loader))
        self.adversary = AdversaryHook.create(config, self.split, self.optimizer)
        self.detector = Detector.create(config.detect, self.splits.num_classes, config.seed)
        self.lr = config.lr  # the rate of the last step applied
        self.lr_mismatches = 0  # steps where the decoder stepped with another rate than the encoder
        self.client_id = config.client_id or uuid.uuid4().hex[:12]
        self.history: list[dict] = []
        self.step_id = self.steps = self.samples = 0
        self.first_step_id = 0  # the step id the server had for this client when the session opened
        self.train_seconds = 0.0
        self.duplicates = 0
        self.resent = 0  # steps sent again under their ids after a turn that died (see `open`)
        self.durable_step_id = 0  # the last step id a server checkpoint holds, as of `make_durable`
        self.tracker = Tracker(config.log_dir)
        # the open epoch's running figures (and batches taken), kept here so that a state written
        # mid-epoch carries them; None between epochs
        self._epoch: dict | None = None
        self._state_step = 0  # the step id of the last state written or resumed from
        self._train_bytes = (0, 0)  # the cloud's byte counts at the end of the last epoch trained

    @property
    def eval_batch_size(self) -> int:
        return self.config.batch_size * 4

    @property
    def done(self) -> bool:
        return bool(self.config.max_steps) and self.steps >= self.config.max_steps

    def open(self, own_count: bool = False) -> None:
        """Open the session. By default the step ids carry on after the last one the server has for
        this client id (an edge process re-joining with --client-id does not know what it sent).
        `own_count`: this trainer's count is the truth (restored, or 0 for a new client id), and
        the steps the server holds beyond it were sent by a turn whose worker died: they are
        sent again, the same batches under the same ids, and the server answers them as
        duplicates (with their gradients while it keeps them), so none is applied twice."""
        last = self.cloud.open(self.config.job, self.client_id, self.split, self.optim, self.config.grad_codec,
                               self.config.seed, self.config.init_job)
        if not own_count:
            self.step_id = self.first_step_id = last
        elif last < self.step_id:
            raise StepsLost(f"client {self.client_id!r}: the server has its steps up to {last}, but it sent "
                            f"{self.step_id} (the server restarted without the checkpoint that held them?)")
        elif last > self.step_id:
            log.warning("client %s: the server holds steps %d..%d of a turn that did not finish; sending them again",
                        self.client_id, self.step_id + 1, last)
            self.resent += last - self.step_id

    def close(self) -> None:
        self.cloud.close()
        self.tracker.close()

    def make_durable(self) -> None:
        """After the last step: wait until the server has checkpointed it, so that the run is
        over only when a crash of the server can no longer take steps back (the report says
        `durable: false` where the server could not or would not)."""
        self.durable_step_id = self.cloud.flush()

    def train_epoch(self) -> dict:
        """One epoch (less if max_steps runs out): a pass over the training data, or `epoch_steps`
        steps carrying on through it; {} once `done`."""
        if self.done:
            return {}
        epoch = len(self.history) + 1
        depth = max(0, self.config.connection.pipeline)
        inflight: deque[_InFlight] = deque()
        if self._epoch is None:
            self._epoch = {"loss": 0.0, "correct": 0, "seen": 0, "taken": 0, "seconds": 0.0}
        tally = self._epoch
        start = time.perf_counter()
        self.encoder.train()
        bar = tqdm(self._epoch_batches(), desc=f"epoch {epoch}", unit="step", disable=not self.config.progress,
                   leave=False, total=self.config.epoch_steps or len(self.loader))
        for x, y in bar:
            x, y = x.to(self.config.device), y.to(self.config.device)
            self.step_id += 1
            z = self._forward(x, stash=depth > 0)
            z_sent, channels = self.adversary.prune(self.obfuscation(z), step=True)
            if self.head is not None:
                inflight.append(self._u_step(_InFlight(x, y, z, z_sent, self.step_id, epoch), channels))
            else:
                fake = self.detector.fake_labels(self.step_id, y) if self.detector else None
                self.cloud.submit(self.step_id, z_sent.detach(), (y if fake is None else fake).cpu(),
                                  self.config.codec, channels)
                inflight.append(_InFlight(x, y, z, z_sent, self.step_id, epoch, fake is not None))
            self.steps += 1
            self._settle(inflight, depth, tally, bar)
            if self.config.state_dir and self.step_id - self._state_step >= self.config.state_every:
                self._settle(inflight, 0, tally, bar)  # a state is written with no step in flight
                now = time.perf_counter()
                tally["seconds"] += now - start
                start = now
                self.save_state()
        self._settle(inflight, 0, tally, bar)
        loss_sum, correct, seen = tally["loss"], tally["correct"], tally["seen"]
        elapsed = tally["seconds"] + time.perf_counter() - start
        self.train_seconds += elapsed
        self._epoch = None
        self._train_bytes = (self.cloud.bytes_up, self.cloud.bytes_down)
        self.samples += seen
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                  "lr": self.lr, "seconds": elapsed, "samples_per_second": seen / elapsed if elapsed else 0.0,
                  **self.cem.end_epoch(epoch, self.train_set), **self.adversary.end_epoch(elapsed, epoch),
                  **self._detect_epoch()}
        self.history.append(record)
        self.tracker.edge_epoch(record, self.counters())
        log.info("epoch %d: loss %.4f acc %.3f, %.0f samples/s%s%s", epoch, record["train_loss"],
                 record["train_accuracy"], record["samples_per_second"], self.cem.summary(record),
                 self.adversary.summary(record))
        if self.config.state_dir:
            self.save_state()
        return record

    def _detect_epoch(self) -> dict:
        """The detector's last scores, for the epoch's history record (none without a detector)."""
        if self.detector is None or not self.detector.checks:
            return {}
        last = self.detector.checks[-1]
        return {key: last[key] for key in ("splitguard", "loss_grad_corr", "label_alignment", "fake_batches")}

    def _epoch_batches(self) -> Iterator:
        """The epoch's batches until `done`: the rest of the open pass (a new one if none is), or
        `epoch_steps` of them, opening passes as they run out."""
        progress = self._epoch
        assert progress is not None
        while not self.done and (progress["taken"] < self.config.epoch_steps or not self.config.epoch_steps):
            if self._pass is None:
                self._open_pass()
            batch = next(self._pass, None)  # type: ignore[arg-type]
            if batch is None:
                self._pass = None
                if not self.config.epoch_steps or not self.pass_offset:  # a pass ended (or there is no data)
                    return
                continue
            self.pass_offset += 1
            progress["taken"] += 1
            yield batch

    def _open_pass(self) -> None:
        self._pass_rng = self.loader.generator.get_state()
        self.passes += 1
        if self.augmented is not None:
            self.augmented.epoch = self.passes  # the pass, as the harness replays it (data.training_order)
        self._pass = iter(self.loader)
        self.pass_offset = 0

    def _settle(self, inflight: deque[_InFlight], keep: int, tally: dict, bar: tqdm) -> None:
        """Apply replies until at most `keep` steps are in flight; count the ones that carried a gradient
        (a re-sent step whose reply the server no longer keeps comes back without loss or gradient)."""
        while len(inflight) > keep:
            item = inflight.popleft()
            reply = self._apply(item)
            if reply.grad is not None and not item.fake:
                tally["loss"] += reply.loss * len(item.y)
                tally["correct"] += reply.correct
                tally["seen"] += len(item.y)
                bar.set_postfix(loss=f"{reply.loss:.3f}")

    def _forward(self, x: torch.Tensor, stash: bool) -> torch.Tensor:
        if not stash:
            return self.encoder(x)
        weights = {name: p.clone() for name, p in self.encoder.named_parameters()}
        return functional_call(self.encoder, weights, (x,))  # buffers not passed: the module's own (BN updates them)

    def _edge_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.encoder.parameters(), *(self.head.parameters() if self.head is not None else ())]

    def _u_step(self, item: _InFlight, channels) -> _InFlight:
        """A U-shaped step's exchange: the cloud's output for the features, the head's loss on it, and
        (unless the cloud applied the step before) the defended dLoss/d(output) up for dL/dz' back.
        The head's own gradients wait in the item for the optimizer step (`_apply`)."""
        assert self.head is not None
        reply = self.cloud.forward(item.step_id, item.z_sent.detach(), self.config.codec, channels)
        if reply.output is None:  # applied before, its reply no longer kept: nothing to learn from
            item.reply = reply
            return item
        self.head.train()
        output = reply.output.to(self.config.device).requires_grad_(True)
        logits = self.head(output)
        loss = torch.nn.functional.cross_entropy(logits, item.y)
        output_grad, *head_grads = torch.autograd.grad(loss, [output, *self.head.parameters()])
        item.head_grads = tuple(head_grads)
        # drawn for a step the cloud applied before as well: a resumed edge's noise stays the uninterrupted run's
        sent = self.label_defense.apply(output_grad.detach().cpu(), self.label_rng, item.y.cpu())
        if not reply.duplicate:
            reply = self.cloud.backward(item.step_id, sent, self.config.codec)
        item.reply = replace(reply, loss=float(loss.detach()), correct=int((logits.argmax(1) == item.y).sum()))
        return item

    def _apply(self, item: _InFlight) -> StepReply:
        reply = item.reply if item.reply is not None else self.cloud.collect(item.step_id)
        if reply.grad is None:  # applied before, its reply no longer kept (an older server): a lost update
            self.duplicates += 1
            return reply
        self._set_lr(item.step_id, reply.lr)
        if self.detector is not None:
            self._detect(item, reply)
            if item.fake:  # the encoder does not learn from wrong labels (SplitGuard's rule)
                return reply
        self.optimizer.zero_grad(set_to_none=True)
        if self.head is not None:
            for param, grad in zip(self.head.parameters(), item.head_grads):
                param.grad = grad
        task = (item.z_sent * reply.grad.to(item.z_sent.device)).sum()  # d task / d z_sent == the cloud's grad
        if self.config.defense.nopeek > 0:
            task = task + self.config.defense.nopeek * nopeek_loss(item.x, item.z)
        penalty = self.adversary.penalty(item.z_sent, item.x, item.step_id)
        if penalty is not None:
            task = task + penalty
        self.cem.backward(task, item.z, item.y, item.epoch)
        self.optimizer.step()
        return reply

    def _detect(self, item: _InFlight, reply: StepReply) -> None:
        """Give the detector this step's figures and, for SplitGuard, the encoder's gradient from the
        cloud's gradient alone (before any defense term: a backward pass of its own, which the
        alignment detector does without); on detection, raise HijackDetected (the run closes its session)."""
        assert self.detector is not None and reply.grad is not None
        flat = None
        if self.detector.needs_encoder_grad:
            params = [p for p in self.encoder.parameters() if p.requires_grad]
            grads = torch.autograd.grad(item.z_sent, params, grad_outputs=reply.grad.to(item.z_sent.device),
                                        retain_graph=True, allow_unused=True)
            flat = torch.cat([g.detach().flatten().cpu() for g in grads if g is not None])
        self.detector.observe(item.step_id, item.fake, flat, reply.loss, reply.grad, item.y.cpu())
        record = self.detector.check(item.step_id)
        if record is not None:
            self.tracker.scalars(item.step_id, {"detect/splitguard": record["splitguard"],
                                                "detect/loss_grad_corr": record["loss_grad_corr"],
                                                "detect/label_alignment": record["label_alignment"]})
        if self.detector.fired is not None:
            log.error("%s", self.detector.reason())
            raise HijackDetected(self.detector.reason(), self.detector.report()["detect"])

    def _set_lr(self, step_id: int, decoder_lr: float) -> None:
        """Step the encoder (and CEM's parameters) at the schedule's rate for this step id, the rate
        the decoder reports it used (equal up to the wire's float32: anything else is a mismatch; a
        server older than schedules reports 0, and is not checked)."""
        self.lr = self.optim.lr_at(step_id)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if decoder_lr and not math.isclose(decoder_lr, self.lr, rel_tol=1e-5):
            self.lr_mismatches += 1
            if self.lr_mismatches == 1:
                log.warning("step %d: the decoder stepped at lr %.6g, the encoder at %.6g (the server's job has "
                            "another base --lr or schedule?)", step_id, decoder_lr, self.lr)

    def to_wire(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder features as the wire carries them: obfuscated, the pruned channels zero (the chain a
        noise-aware attacker replays)."""
        return self.adversary.prune(self.obfuscation(z))[0]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features as the cloud receives them at inference (eval mode, `to_wire`)."""
        self.encoder.eval()
        return self.to_wire(self.encoder(x.to(self.config.device)))

    def evaluate(self, test_set: Dataset | None = None) -> float:
        labels: deque[torch.Tensor] = deque()

        def batches():
            dataset = self.splits.test if test_set is None else test_set  # an empty subset stays empty
            for x, y in DataLoader(dataset, batch_size=self.eval_batch_size):
                labels.append(y)
                yield self.encode(x)

        correct = total = 0
        for logits in self.cloud.infer(batches(), self.config.codec, self.adversary.channels()):
            if self.head is not None:  # the cloud answered its middle's output
                self.head.eval()
                with torch.no_grad():
                    logits = self.head(logits.to(self.config.device)).cpu()
            y = labels.popleft()
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        accuracy = correct / max(total, 1)
        self.tracker.scalars(len(self.history), {"test/accuracy": accuracy})
        return accuracy

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The weights the edge trains: the encoder's and, in the U-shaped split, the head's as "head.*"
        (so that sequential training passes the head on with the encoder, and SplitFed averages both)."""
        head = {f"head.{k}": v for k, v in self.head.state_dict().items()} if self.head is not None else {}
        return {k: v.detach().cpu().clone() for k, v in {**self.encoder.state_dict(), **head}.items()}

    def load_encoder_state(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt weights from elsewhere (FedAvg, the previous client in turn); momentum restarts,
        since the old buffers point along a trajectory these weights did not take."""
        self._load_weights(state)
        self.optimizer.state.clear()

    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """`encoder_state`'s dict into the encoder and the head; a head missing from it, or there
        without one here, is a state of another model (RuntimeError, as load_state_dict's)."""
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        self.encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
        if self.head is not None:
            self.head.load_state_dict(head)
        elif head:
            raise RuntimeError("the weights hold a head of the U-shaped split, this edge runs the vanilla split")

    def recalibrate_batch_norm(self) -> None:
        """Measure the encoder's batch-norm statistics afresh on this client's training data.

        Running statistics describe the weights that produced them: after weights are
        averaged (FedAvg) the averaged running statistics are not those of the averaged
        encoder's activations, and evaluation in eval mode is thrown off by the mismatch.
        One forward pass (no server, no gradients) replaces them with the cumulative mean
        and variance over the shard; `update_bn` leaves an encoder without batch norm alone.
        """
        update_bn(DataLoader(self.train_set, batch_size=self.eval_batch_size), self.encoder, self.config.device)

    def snapshot(self, encoder: bool) -> TrainerState:
        """This trainer's state (see TrainerState), between epochs or, for a state file, between steps
        with none in flight; `encoder`: with the encoder's weights and optimizer state (a client
        that keeps its own encoder)."""
        open_ = self._pass is not None
        return TrainerState(
            self.step_id, self.first_step_id, self.steps, self.samples, self.train_seconds, self.duplicates,
            self.resent, self.lr, self.lr_mismatches, self.durable_step_id, list(self.history), self.passes,
            self.pass_offset if open_ else 0, self._pass_rng if open_ else self.loader.generator.get_state(),
            self.obfuscation.generator.get_state(),
            {key: copy.copy(getattr(self.cloud, key)) for key in CLOUD_COUNTERS},
            self.encoder_state() if encoder else None,
            copy.deepcopy(self.optimizer.state_dict()) if encoder else None, copy.deepcopy(self.adversary.state()),
            self.label_rng.get_state())

    def restore(self, state: TrainerState) -> None:
        """Carry on from `state` (a fresh trainer of the same config, before `open(own_count=True)`)."""
        (self.step_id, self.first_step_id, self.steps, self.samples, self.train_seconds, self.duplicates,
         self.resent, self.lr, self.lr_mismatches, self.durable_step_id) = (
            state.step_id, state.first_step_id, state.steps, state.samples, state.train_seconds, state.duplicates,
            state.resent, state.lr, state.lr_mismatches, state.durable_step_id)
        self.history = list(state.history)
        for key, value in state.cloud.items():
            setattr(self.cloud, key, copy.copy(value))
        self._train_bytes = (self.cloud.bytes_up, self.cloud.bytes_down)  # a state is written between steps
        self.obfuscation.generator.set_state(state.noise_rng)
        self.loader.generator.set_state(state.loader_rng)
        self.passes = state.passes
        if state.pass_offset:  # within a pass: draw it again from its generator state and skip what was taken
            self.passes -= 1
            self._open_pass()
            for _ in range(state.pass_offset):
                next(self._pass)  # type: ignore[arg-type]
            self.pass_offset = state.pass_offset
        if state.encoder is not None:
            self._load_weights(state.encoder)
            self.optimizer.load_state_dict(state.optimizer)
        if state.label_rng is not None:
            self.label_rng.set_state(state.label_rng)
        self.adversary.load_state(state.adversary)

    def save_state(self, path: str | Path | None = None) -> None:
        """Write this trainer's whole state (edge_client.state) to `path` (default: the config's
        state_dir), with no step in flight; from now on the cloud keeps the replies of later steps,
        for a trainer that resumes from this state to get them again. The cloud first makes the
        steps the state covers durable (Flush: a server with --checkpoint-dir checkpoints the job),
        so that the server is never behind a state, even when both ends crash together (a machine
        that went away): a state ahead of the server's checkpoint could not be resumed. Where the
        cloud does not confirm (NotDurable), no state is written: the last one stays, and the next
        step tries again."""
        try:
            self.durable_step_id = self.cloud.flush(strict=True)
        except NotDurable as err:
            log.warning("client %s: no state at step %d, the one of step %d stays: %s", self.client_id,
                        self.step_id, self._state_step, err)
            return
        state_file.write(path or state_file.path_in(self.config.state_dir), {
            "identity": state_file.identity(self.config, self.split), "client_id": self.client_id,
            "trainer": asdict(self.snapshot(encoder=True)), "epoch": copy.deepcopy(self._epoch),
            "torch_rng": torch.get_rng_state(), "cem": self.cem.state(),
            **({"detect": self.detector.state()} if self.detector is not None else {})})
        self._state_step = self.step_id
        self.cloud.hold_replies_after(self.step_id)

    def resume_from(self, path: str | Path) -> None:
        """Carry on from the state in `path` (a fresh trainer, before `open(own_count=True)`); the
        client id is the state's. StateError if the file is damaged or another run's."""
        self._adopt(path, self._read_state(path))

    def _read_state(self, path: str | Path) -> dict:
        """The state in `path`, checked to be whole and this run's (changes nothing here)."""
        return state_file.read(path, state_file.identity(self.config, self.split), self.config.client_id)

    def _adopt(self, path: str | Path, saved: dict) -> None:
        try:
            self.cem.load_state(saved["cem"])  # first: once CEM joined the optimizer, its state has CEM's group
            self.restore(TrainerState(**saved["trainer"]))
            torch.set_rng_state(saved["torch_rng"])
            if self.detector is not None and saved.get("detect") is not None:  # absent: a state from before it
                self.detector.load_state(saved["detect"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a tensor that does not fit
            raise state_file.StateError(path, f"does not fit this run's model ({type(err).__name__}: "
                                              f"{str(err).splitlines()[0][:200]})") from None
        self.client_id, self._epoch, self._state_step = saved["client_id"], saved["epoch"], self.step_id
        self.cloud.hold_replies_after(self.step_id)
        log.info("resumed client %s from %s at step %d (epoch %d%s)", self.client_id, path, self.step_id,
                 len(self.history) + 1, ", mid-epoch" if self._epoch else "")

    def start(self) -> None:
        """Open the session, resuming from the config's state_dir first where it asks to: a run
        that resumed sends again the steps the server applied after its state (`open`). A state
        that is checked whole and this run's but does not fit the model is refused even with
        fresh_on_bad_state, since part of it may have been adopted already. A fresh
        run with a state_dir writes its state at once, so that a kill before its first scheduled
        state still resumes (from step 0), and refuses to overwrite a state it was not told to resume."""
        path = state_file.path_in(self.config.state_dir) if self.config.state_dir else None
        resumed = False
        if path is not None and path.exists():
            if not self.config.resume:
                raise state_file.StateError(path, "holds the state of an earlier run: pass --resume to carry it "
                                                  "on, or remove the file to start over")
            try:
                saved = self._read_state(path)
            except state_file.StateError as err:  # only before anything was adopted can a fresh start follow
                if not self.config.fresh_on_bad_state:
                    raise
                log.warning("%s; starting afresh instead (--fresh-on-bad-state), the file will be overwritten", err)
            else:
                self._adopt(path, saved)
                resumed = True
        self.open(own_count=resumed)
        if path is not None and not resumed:
            self.save_state()

    def save_encoder(self, path: str) -> None:
        """Encoder weights with the model, defense (and the channels it sends), job and codec
        (`splitnet.encoder_file`)."""
        encoder_file.write(path, self.split, {**self.config.defense.as_dict(), **self.adversary.wire_settings()},
                           self.config.job, self.config.codec)

    def counters(self) -> dict:
        """The running figures of the report, cheap enough to read after every epoch (no evaluation)."""
        cloud = self.cloud
        return {
            "steps": self.steps,
            "train_samples": self.samples,
            "epochs": len(self.history),
            "done": self.done,
            "bytes_up": cloud.bytes_up,
            "bytes_down": cloud.bytes_down,
            "bytes_up_per_sample": cloud.bytes_up / max(self.samples, 1),
            "bytes_down_per_sample": cloud.bytes_down / max(self.samples, 1),
            # training traffic alone (the counts above include evaluation's), per step: what a mode costs
            "bytes_up_per_step": self._train_bytes[0] / max(self.steps, 1),
            "bytes_down_per_step": self._train_bytes[1] / max(self.steps, 1),
            "wall_seconds": self.train_seconds,
            # per pass over the training set, also when max_steps ends the run inside an epoch
            "seconds_per_epoch": self.train_seconds * len(self.train_set) / self.samples if self.samples else 0.0,
            "samples_per_second": self.samples / self.train_seconds if self.train_seconds else 0.0,
            "rtt_ms_p50": percentile(cloud.rtt_ms, 50),
            "rtt_ms_p99": percentile(cloud.rtt_ms, 99),
            "reconnects": cloud.reconnects,
            "replayed_steps": cloud.replayed_steps,
            "duplicate_steps": self.duplicates,
            "resent_steps": self.resent,
            "last_step_id": self.step_id,
            "durable_step_id": self.durable_step_id,
            "durable": self.durable_step_id >= self.step_id > 0,
            "lr_mismatch_steps": self.lr_mismatches,
        }

    def report(self, accuracy: float) -> dict:
        """The JSON report (keys documented in README.md)."""
        cfg, spec = self.config, self.split.spec
        last = self.history[-1] if self.history else {}
        gap, warnings = generalization(last.get("train_accuracy"), accuracy)
        warnings += self.adversary.warnings()
        for warning in warnings:
            log.warning("%s", warning)
        return {
            "test_accuracy": accuracy,
            "train_loss": last.get("train_loss"),
            "generalization_gap": gap,
            "warnings": warnings,
            **self.counters(),
            "codec": cfg.codec,
            "grad_codec": cfg.grad_codec,
            "arch": spec.arch,
            "cut": spec.cut,
            "bottleneck": spec.bottleneck,
            "feature_shape": list(self.split.feature_shape),
            "dataset": cfg.data.name,
            "train_set_size": len(self.train_set),
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "lr_schedule": self.optim.schedule.as_dict(),
            "width": spec.width,
            "augment": self.augment,
            "seed": cfg.seed,
            "pipeline": cfg.connection.pipeline,
            "job": cfg.job,
            "client_id": self.client_id,
            "session_id": self.cloud.session_id,
            "session_ids": list(self.cloud.session_ids),
            "first_step_id": self.first_step_id,
            "train_shard": self.train_set is not self.splits.train,
            "eval_batch_size": self.eval_batch_size,
            "server": cfg.connection.server,
            "defense": cfg.defense.as_dict(),
            "init_from": cfg.init_from,
            "init_job": cfg.init_job,
            "u_shaped": cfg.u_shaped,
            "head_cut": spec.head_cut,
            "label_defense": {"kind": cfg.label_defense, "strength": cfg.label_defense_strength},
            **self.cem.report(self.train_set),
            **self.adversary.report(),
            **(self.detector.report() if self.detector is not None else {}),
            "history": self.history,
        }


def run(config: EdgeConfig, cloud: Cloud, splits: data.Splits | None = None,
        train_set: Dataset | None = None) -> dict:
    """Open (resuming from config.state_dir where config.resume asks), train the epochs left (or
    to max_steps), make them durable, measure the encoder's batch-norm statistics afresh where an
    epoch is short (SHORT_EPOCH_STEPS), evaluate, close; return the report."""
    trainer = EdgeTrainer(config, cloud, splits, train_set)
    try:
        trainer.start()
        try:
            while len(trainer.history) < config.epochs and not trainer.done:
                trainer.train_epoch()
        except HijackDetected as err:  # no evaluation through a hijacker: the report so far, then close
            err.report = {**trainer.report(math.nan), "detected": True, "reason": err.reason}
            raise
        trainer.make_durable()
        if config.state_dir:
            trainer.save_state()  # the finished run: a kill from here on resumes to evaluate only
        if len(trainer.loader) < SHORT_EPOCH_STEPS:
            # Running statistics average the last ~20-40 steps (momentum 0.1): where an epoch is
            # shorter than that, they mix the weights of epochs before the last (docs/TRAINING.md,
            # "Batch-norm statistics"); measured afresh, evaluation and the saved encoder use the
            # final weights'. Longer epochs keep theirs: they already describe the last epoch.
            trainer.recalibrate_batch_norm()
        accuracy = trainer.evaluate()
    finally:
        trainer.close()
    if config.save_encoder:
        trainer.save_encoder(config.save_encoder)
    return trainer.report(accuracy)

