"""Detecting a hijacking cloud from the edge (`edge-client --detect splitguard`).

SplitGuard (Erdogan, Küpçü and Çiçek, WPES 2022): now and then the edge sends a batch
whose labels are all wrong (each label shifted by the same random non-zero amount modulo
the class count) and keeps the encoder's gradient that comes back for it apart from those
of real batches, which it splits at random into two halves R1 and R2. An honest cloud
trains the task, so a batch with wrong labels gets a larger gradient pointing elsewhere; a
hijacker's gradient does not depend on the labels (`splitnet.fsha`), so fake and real
gradients look alike. The score compares the fake-vs-real difference (angle between the
mean gradients, weighted by the difference of their mean norms) with the real-vs-real one
and squashes it to (0, 1): near 1 for an honest cloud, near sigmoid(0)^2 = 0.25 for a
hijacker. Below `threshold`: detected.

Two cheaper signals need no fake batch and are reported beside SplitGuard's score
(docs/RESULTS_HIJACK.md compares them on the same runs); the first one decides instead of
SplitGuard with `--detect alignment`:
- `label_alignment`: within a real batch, the mean cosine similarity of the per-sample
  gradients the cloud returns for samples of the same label, less that for samples of
  different labels, averaged over the real batches. An honest cross-entropy gradient is
  W^T (p - onehot(y)): samples that share a label share most of it. A hijacker's depends on
  the features alone. Free: no fake batch, no extra backward, no accuracy lost.
- `loss_grad_corr`: the correlation, over the real steps, between the loss the cloud reports
  and the norm of the gradient it returns ("the loss falls but the gradients keep their
  size"). Measured, it does not separate the two (an honest decoder's gradients grow while
  its weights do, early on), which is why nothing decides on it.

Only running sums are kept (sums of gradients and of their norms), so a long run costs the
size of one gradient three times, not one per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edge_client.config import DetectConfig


class HijackDetected(RuntimeError):
    """The detector fired: the edge stopped sending data. `detection`: the detector's figures;
    `report`: the edge's report up to the stop (`edge_client.trainer.run` fills it in)."""

    def __init__(self, reason: str, detection: dict) -> None:
        super().__init__(reason)
        self.reason, self.detection = reason, detection
        self.report: dict = {"detected": True, "reason": reason, "detect": detection}  # `run` adds the trainer's

    def __reduce__(self):
        """Pickled whole: a Ray actor's error crosses to the driver pickled, and the default (the message
        alone) could not be rebuilt there ("Failed to deserialize exception", the detection lost)."""
        return type(self), (self.reason, self.detection), {"report": self.report}


class _Running:
    """The mean of a set of gradient vectors and the mean of their norms, from running sums."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.norms = 0.0
        self.count = 0

    def add(self, g: Tensor) -> None:
        self.total = g.clone() if self.total is None else self.total + g
        self.norms += float(g.norm())
        self.count += 1

    @property
    def mean(self) -> Tensor:
        assert self.total is not None
        return self.total / self.count

    def state(self) -> dict:
        return {"total": None if self.total is None else self.total.clone(), "norms": self.norms, "count": self.count}

    def load_state(self, state: dict) -> None:
        self.total, self.norms, self.count = state["total"], float(state["norms"]), int(state["count"])

    @property
    def mean_norm(self) -> float:
        return self.norms / self.count


def _angle(a: Tensor, b: Tensor) -> float:
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return math.acos(max(-1.0, min(1.0, cos)))


def splitguard_score(fakes: _Running, r1: _Running, r2: _Running, mult: float = 5.0, exponent: float = 2.0) -> float:
    """SplitGuard's score in (0, 1) from the fake batches' gradients and the two halves of the real ones."""
    regular = (r1.mean + r2.mean) / 2
    regular_norm = (r1.mean_norm + r2.mean_norm) / 2
    d_fake = abs(fakes.mean_norm - regular_norm)
    d_real = abs(r1.mean_norm - r2.mean_norm)
    scale = d_fake + d_real or 1.0
    x = _angle(fakes.mean, regular) * d_fake / scale - _angle(r1.mean, r2.mean) * d_real / scale
    return (1 / (1 + math.exp(-mult * x))) ** exponent


def label_alignment(grad: Tensor, labels: Tensor) -> float:
    """Mean cosine similarity of per-sample gradients of the same label less that of different labels
    (NaN where the batch has no such pair)."""
    g = torch.nn.functional.normalize(grad.flatten(1).double(), dim=1)
    sim = g @ g.T
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    within, across = sim[same & off], sim[~same]
    return float(within.mean() - across.mean()) if len(within) and len(across) else math.nan


def pearson(xs: list[float], ys: list[float]) -> float:
    """Their correlation; NaN for fewer than 3 pairs or a constant series."""
    if len(xs) < 3:
        return math.nan
    t = torch.tensor([xs, ys], dtype=torch.float64)
    c = torch.corrcoef(t)[0, 1]
    return float(c)


class Detector:
    """One edge's detector: which steps are fake, the gradients they got, the scores and the decision."""

    def __init__(self, config: DetectConfig, num_classes: int, seed: int) -> None:
        self.config, self.num_classes = config, num_classes
        self.generator = torch.Generator().manual_seed(seed + 2027)  # apart from the data order and the noise
        self.fakes, self.r1, self.r2 = _Running(), _Running(), _Running()
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.alignments: list[float] = []
        self.checks: list[dict] = []  # one per check: step, fakes, score, loss_grad_corr
        self.fake_steps = 0
        self.fired: dict | None = None

    @classmethod
    def create(cls, config: DetectConfig, num_classes: int, seed: int) -> "Detector | None":
        return cls(config, num_classes, seed) if config.detect != "none" else None

    def fake_labels(self, step_id: int, y: Tensor) -> Tensor | None:
        """The labels to send in place of `y` if this step is a fake batch, else None. Drawn from the
        detector's own generator, so the data order is the same with the detector on or off."""
        draw = float(torch.rand((), generator=self.generator))
        shift = int(torch.randint(1, self.num_classes, (), generator=self.generator))
        if (self.config.detect != "splitguard" or step_id <= self.config.detect_start
                or draw >= self.config.detect_fake_rate):
            return None
        self.fake_steps += 1
        return (y + shift) % self.num_classes

    @property
    def needs_encoder_grad(self) -> bool:
        """Only SplitGuard's score reads the encoder's gradients (a backward pass a step to get)."""
        return self.config.detect == "splitguard"

    def observe(self, step_id: int, fake: bool, encoder_grad: Tensor | None, loss: float, feature_grad: Tensor,
                labels: Tensor) -> None:
        """The reply of a step: the encoder's gradient (flattened) from the cloud's gradient alone (None
        where `needs_encoder_grad` is false), the loss it reported, the gradient it returned on the
        features and the batch's true labels."""
        if fake:
            self.fakes.add(encoder_grad)
        else:
            if step_id > self.config.detect_start:
                half = self.r1 if float(torch.rand((), generator=self.generator)) < 0.5 else self.r2
                if encoder_grad is not None:
                    half.add(encoder_grad)
            self.losses.append(loss)
            self.grad_norms.append(float(feature_grad.norm()))
            alignment = label_alignment(feature_grad, labels)
            if math.isfinite(alignment):
                self.alignments.append(alignment)

    def check(self, step_id: int) -> dict | None:
        """Every `detect_every` steps, once there is enough to score: the scores (also into the
        history); the check that detects is remembered in `fired`. SplitGuard decides by its score
        (it needs fake batches and two halves of real ones); `alignment` by the label alignment
        (it needs `detect_start` steps)."""
        c = self.config
        splitguard = c.detect == "splitguard"
        ready = (self.fakes.count >= c.detect_min_fakes and min(self.r1.count, self.r2.count) >= 2 if splitguard
                 else step_id >= c.detect_start and bool(self.alignments))
        if step_id % c.detect_every or not ready:
            return None
        start = min(c.detect_start, len(self.losses) // 2)
        record = {"step_id": step_id, "fake_batches": self.fakes.count,
                  "splitguard": splitguard_score(self.fakes, self.r1, self.r2) if splitguard else math.nan,
                  "loss_grad_corr": pearson(self.losses[start:], self.grad_norms[start:]),
                  "label_alignment": sum(self.alignments) / len(self.alignments) if self.alignments else math.nan}
        self.checks.append(record)
        fires = (record["splitguard"] < c.detect_threshold if splitguard
                 else record["label_alignment"] < c.detect_alignment_threshold)
        if fires and self.fired is None:
            self.fired = record
        return record

    def state(self) -> dict:
        """What a resumed edge needs to detect as this one would (edge_client.state): the generator, the
        running sums, the series and the checks so far. Plain values and tensors."""
        return {"generator": self.generator.get_state(), "fakes": self.fakes.state(), "r1": self.r1.state(),
                "r2": self.r2.state(), "losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "alignments": list(self.alignments), "checks": [dict(c) for c in self.checks],
                "fake_steps": self.fake_steps, "fired": dict(self.fired) if self.fired else None}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        for name in ("fakes", "r1", "r2"):
            getattr(self, name).load_state(state[name])
        self.losses, self.grad_norms = list(state["losses"]), list(state["grad_norms"])
        self.alignments, self.checks = list(state["alignments"]), [dict(c) for c in state["checks"]]
        self.fake_steps, self.fired = int(state["fake_steps"]), state["fired"]

    def reason(self) -> str:
        f, c = self.fired or {}, self.config
        why = (f"SplitGuard score {f.get('splitguard', math.nan):.3f} < threshold {c.detect_threshold:g} after "
               f"{f.get('fake_batches')} fake batches" if c.detect == "splitguard" else
               f"label alignment {f.get('label_alignment', math.nan):.3f} < threshold {c.detect_alignment_threshold:g}")
        return (f"hijacking suspected at step {f.get('step_id')}: {why} (the cloud's gradients do not depend on the "
                "labels); stopped sending data")

    def report(self) -> dict:
        """The detector's figures for the report: settings, every check, and whether / when it fired."""
        last = self.checks[-1] if self.checks else {}
        return {"detect": {"method": self.config.detect, **self.config.as_dict(), "fake_steps": self.fake_steps,
                           "checks": list(self.checks), "detected": self.fired is not None,
                           "detected_at_step": (self.fired or {}).get("step_id"),
                           "last_splitguard": last.get("splitguard"),
                           "last_loss_grad_corr": last.get("loss_grad_corr"),
                           "last_label_alignment": last.get("label_alignment")}}
