"""The edge's feature defenses (docs/ATTACKS_AND_METRICS.md §3); pure torch.

DefenseConfig holds all of them. The obfuscation between the encoder and the wire
(noise, dropout, top-k) is `splitnet.obfuscation`, shared with the noise-aware attacker.
NoPeek and CEM are training-time losses: NoPeek is `nopeek_loss` here, CEM lives in the
`cem` package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

import cem
from splitnet.obfuscation import ObfuscationConfig, finite, obfuscation_checks

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
            *obfuscation_checks(self.noise, self.noise_kind, self.dropout, self.topk),
            ("nopeek", finite(self.nopeek) and self.nopeek >= 0, "a finite number >= 0"),
            ("cem", self.cem in CEM_CHOICES, f"one of {CEM_CHOICES}"),
            ("lam", finite(self.lam) and self.lam >= 0, "a finite number >= 0"),
            ("var_threshold", finite(self.var_threshold) and self.var_threshold > 0, "a finite number > 0"),
            ("cem_scale", self.cem_scale is None or (finite(self.cem_scale) and self.cem_scale >= 0),
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

    @property
    def obfuscation(self) -> ObfuscationConfig:
        """The settings of the chain applied before the wire (and by a noise-aware attacker)."""
        return ObfuscationConfig(self.noise, self.noise_kind, self.dropout, self.topk)

    def as_dict(self) -> dict[str, Any]:
        """The fields with the CEM defaults resolved, for reports (stable keys)."""
        return {**asdict(self), "cem_scale": self.scale, "cem_warmup": self.warmup}


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
