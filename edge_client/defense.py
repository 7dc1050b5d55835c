"""The edge's feature defenses (ATTACKS_AND_METRICS.md "Defenses"); pure torch.

`Obfuscation` is what stands between the encoder and the wire: noise, then a dropout
mask, then top-k pruning, identical in training and inference (an attacker sees the
same kind of features either way). NoPeek and CEM are training-time losses: NoPeek is
`nopeek_loss` here, CEM lives in the `cem` package and is configured by DefenseConfig.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import cem

NOISE_KINDS = ("gaussian", "laplace")
CEM_CHOICES = ("none", *cem.SURROGATES)


class InvalidDefense(ValueError):
    """A DefenseConfig field out of range; `field` lets a command line name its own flag."""

    def __init__(self, field: str, expected: str, value) -> None:
        super().__init__(f"DefenseConfig.{field} must be {expected}, got {value!r}")
        self.field, self.expected, self.value = field, expected, value


@dataclass(frozen=True)
class DefenseConfig:
    noise: float = 0.0  # sigma: Gaussian std, or Laplace scale b
    noise_kind: str = "gaussian"
    dropout: float = 0.0  # p: share of features zeroed, no 1/(1-p) rescale
    topk: float = 0.0  # r: share of the smallest |features| zeroed per sample
    nopeek: float = 0.0  # w: weight of dCor(x, z) in the task loss
    cem: str = "none"
    lam: float = 0.0  # lambda: weight of the CEM gradient on the encoder
    var_threshold: float = 0.125
    cem_scale: float | None = None  # attention_loss_scale; None: cem.DEFAULTS
    cem_warmup: int | None = None  # epochs without CEM; None: cem.DEFAULTS
    learn_gates: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks: list[tuple[str, bool, str]] = [
            ("noise", _finite(self.noise) and self.noise >= 0, "a finite number >= 0"),
            ("noise_kind", self.noise_kind in NOISE_KINDS, f"one of {NOISE_KINDS}"),
            ("dropout", _finite(self.dropout) and 0 <= self.dropout < 1, "in [0, 1)"),
            ("topk", _finite(self.topk) and 0 <= self.topk < 1, "in [0, 1)"),
            ("nopeek", _finite(self.nopeek) and self.nopeek >= 0, "a finite number >= 0"),
            ("cem", self.cem in CEM_CHOICES, f"one of {CEM_CHOICES}"),
            ("lam", _finite(self.lam) and self.lam >= 0, "a finite number >= 0"),
            ("var_threshold", _finite(self.var_threshold) and self.var_threshold > 0, "a finite number > 0"),
            ("cem_scale", self.cem_scale is None or (_finite(self.cem_scale) and self.cem_scale >= 0),
             "None or a finite number >= 0"),
            ("cem_warmup", self.cem_warmup is None or (isinstance(self.cem_warmup, int) and self.cem_warmup >= 0),
             "None or an int >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InvalidDefense(name, expected, getattr(self, name))

    @property
    def scale(self) -> float:
        """attention_loss_scale in use (0 without CEM)."""
        if self.cem == "none":
            return 0.0
        return float(self.cem_scale if self.cem_scale is not None else cem.DEFAULTS[self.cem]["scale"])

    @property
    def warmup(self) -> int:
        """Warm-up epochs in use (0 without CEM)."""
        if self.cem == "none":
            return 0
        return int(self.cem_warmup if self.cem_warmup is not None else cem.DEFAULTS[self.cem]["warmup"])

    def cem_active(self, epoch: int) -> bool:
        """Whether CEM runs in this epoch (counted from 1)."""
        return self.cem != "none" and cem.is_active(self.lam, self.noise, epoch, self.warmup)

    def as_dict(self) -> dict[str, Any]:
        """The fields with the CEM defaults resolved, for reports (stable keys)."""
        return {**asdict(self), "cem_scale": self.scale, "cem_warmup": self.warmup}


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Obfuscation(nn.Module):
    """noise -> dropout mask (no rescale) -> top-k pruning; the same in train and eval mode.

    Random draws come from `generator` when given (on its own device, then moved), so a
    run can be replayed exactly; otherwise from torch's global RNG.
    """

    def __init__(self, config: DefenseConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config, self.generator = config, generator

    def _rand(self, like: torch.Tensor, normal: bool = False) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else like.device
        draw = torch.randn if normal else torch.rand
        return draw(like.shape, generator=self.generator, device=device, dtype=like.dtype).to(like.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.noise > 0:
            if cfg.noise_kind == "gaussian":
                eps = self._rand(z, normal=True)
            else:  # Laplace(0, 1) as the difference of two Exp(1) draws; 1 - U in (0, 1] keeps log finite
                eps = torch.log1p(-self._rand(z)) - torch.log1p(-self._rand(z))
            z = z + cfg.noise * eps
        if cfg.dropout > 0:
            z = z * (self._rand(z) >= cfg.dropout).to(z.dtype)
        if cfg.topk > 0:
            z = topk_prune(z, cfg.topk)
        return z


def topk_prune(z: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the floor(ratio * n) smallest-magnitude features of each sample (n per sample).

    Done through a mask, so the kept features pass their gradient unchanged.
    """
    flat = z.flatten(1)
    drop = int(ratio * flat.shape[1])
    if drop == 0:
        return z
    idx = flat.abs().topk(drop, dim=1, largest=False).indices
    mask = torch.ones_like(flat).scatter_(1, idx, 0.0)
    return (flat * mask).view_as(z)


def nopeek_loss(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Distance correlation dCor(x, z) (Szekely et al. 2007; NoPeek, Vepakomma et al. 2020).

    Euclidean pairwise distances within the batch, double-centred; the V-statistic
    dCor = sqrt(dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z))) in [0, 1]. eps keeps the
    square roots differentiable when a batch is constant.
    """
    a, b = _centred_distances(x), _centred_distances(z)
    dcov2 = (a * b).mean()
    dvar2 = ((a * a).mean() * (b * b).mean()).clamp_min(eps).sqrt()
    return (dcov2 / dvar2).clamp_min(eps).sqrt()


def _centred_distances(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1).float()  # cdist has no half-precision CPU kernel
    d = torch.cdist(flat, flat)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
