"""Learning-rate schedules both ends follow step for step.

The edge's encoder optimizer and the cloud's decoder optimizer must agree on the learning
rate of every step, also when the edge runs gradients late (pipelining), when several
clients share one decoder, and across a server restart. A stateful torch scheduler cannot
promise that: its counter is the number of `step()` calls made on one side. Here the rate
is a pure function of the client's step id (its steps are numbered 1, 2, 3, ... on both
ends), so the only state is the step id, which both ends already keep and checkpoint.

The shapes are torch's: `multistep` equals `MultiStepLR` stepped once per epoch
(milestones are epoch indices, counted from 0), `cosine` equals `CosineAnnealingLR`
stepped once per step down to 0 over the steps after the warm-up; the warm-up ramps
linearly from lr / W to lr over its W steps (tests compare each with torch's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "multistep", "cosine")
MAX_MILESTONES = 64

# The CEM paper's recipe, lr 0.05 dropped x0.2 at epochs 60/120/180/210 of 240, as fractions of
# any run's length. Its last two phases run below lr 4.1e-4 (0.05 * 0.2^3 = 4e-4), where CEM's
# w_lr = 0.001 / lr becomes 1: CEM at full lambda, after the task has converged.
PAPER_FRACTIONS = (0.25, 0.5, 0.75, 0.875)
PAPER_GAMMA = 0.2


@dataclass(frozen=True)
class LrSchedule:
    kind: str = "constant"
    milestones: tuple[int, ...] = ()  # multistep: epochs at which the rate is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    epochs: int = 1  # the run's length, which cosine needs
    steps_per_epoch: int = 1  # this client's batches per epoch: the unit that turns epochs into steps

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ValueErrors name the field (the server sends them back as INVALID_ARGUMENT)."""
        if self.kind not in KINDS:
            raise ValueError(f"lr_schedule.kind: {self.kind!r} is not one of {list(KINDS)}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ValueError(f"lr_schedule.milestones: {list(self.milestones)[:8]} must be increasing epochs >= 1")
        if len(self.milestones) > MAX_MILESTONES:
            raise ValueError(f"lr_schedule.milestones: at most {MAX_MILESTONES}")
        if self.kind == "multistep" and not self.milestones:
            raise ValueError("lr_schedule.milestones: multistep needs at least one milestone")
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"lr_schedule.gamma: {self.gamma} must lie in (0, 1]")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(f"lr_schedule.warmup_epochs: {self.warmup_epochs} must lie in [0, epochs={self.epochs}]")
        if not 1 <= self.epochs <= 1_000_000:
            raise ValueError(f"lr_schedule.epochs: {self.epochs} must lie in [1, 1000000]")
        if not 1 <= self.steps_per_epoch <= 1 << 40:
            raise ValueError(f"lr_schedule.steps_per_epoch: {self.steps_per_epoch} must be >= 1")

    @classmethod
    def parse(cls, text: str, epochs: int, steps_per_epoch: int = 1, warmup_epochs: float = 0.0) -> "LrSchedule":
        """`constant`, `cosine`, `multistep:E1,E2,...:GAMMA` or `paper` (the `--lr-schedule` flag's
        syntax); `paper` is the CEM paper's multistep scaled to `epochs` (at least 8)."""
        kind, _, rest = text.strip().partition(":")
        if kind == "paper" and not rest:
            if epochs < 8:
                raise ValueError(f"lr_schedule.epochs: the paper schedule needs --epochs >= 8 for its four "
                                 f"drops, not {epochs}")
            milestones = tuple(sorted({max(1, round(f * epochs)) for f in PAPER_FRACTIONS}))
            return cls("multistep", milestones, PAPER_GAMMA, warmup_epochs, epochs, steps_per_epoch)
        if kind != "multistep":
            if rest:
                raise ValueError(f"--lr-schedule {text!r}: only multistep takes arguments "
                                 "(multistep:E1,E2,...:GAMMA)")
            return cls(kind, (), 0.1, warmup_epochs, epochs, steps_per_epoch)
        points, _, gamma = rest.partition(":")
        try:
            milestones = tuple(int(v) for v in points.split(",") if v.strip())
            factor = float(gamma) if gamma else 0.1
        except ValueError:
            raise ValueError(f"--lr-schedule {text!r}: expected multistep:E1,E2,...:GAMMA, "
                             "e.g. multistep:60,120,180:0.2") from None
        return cls(kind, milestones, factor, warmup_epochs, epochs, steps_per_epoch)

    def for_run(self, steps_per_epoch: int) -> "LrSchedule":
        """The same schedule measured in a client's own steps."""
        return LrSchedule(self.kind, self.milestones, self.gamma, self.warmup_epochs, self.epochs, steps_per_epoch)

    def factor(self, step_id: int) -> float:
        """The multiplier of the base rate for the client's step `step_id` (1-based)."""
        step = max(step_id, 1) - 1  # steps done before this one
        warmup_steps = round(self.warmup_epochs * self.steps_per_epoch)
        warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        if self.kind == "multistep":
            epoch = step // self.steps_per_epoch
            return warm * self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        if self.kind == "cosine":
            span = max(1, self.epochs * self.steps_per_epoch - warmup_steps)
            progress = min(1.0, max(0, step - warmup_steps) / span)
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm

    def describe(self) -> str:
        text = self.kind
        if self.kind == "multistep":
            text += f":{','.join(map(str, self.milestones))}:{self.gamma:g}"
        return text + (f" after {self.warmup_epochs:g} warm-up epochs" if self.warmup_epochs else "")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "milestones": list(self.milestones), "gamma": self.gamma,
                "warmup_epochs": self.warmup_epochs, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch}

    @classmethod
    def from_dict(cls, d: dict) -> "LrSchedule":
        return cls(d["kind"], tuple(int(m) for m in d["milestones"]), float(d["gamma"]), float(d["warmup_epochs"]),
                   int(d["epochs"]), int(d["steps_per_epoch"]))
