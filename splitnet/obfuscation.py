"""The obfuscation between the encoder and the wire: a contract of the edge and the attacker.

The edge applies it to every feature batch it sends; the noise-aware attacker applies
the same chain, with the settings the edge saved next to its encoder, to its own
training features, so that its inverse network learns on what the wire carries. Both
must draw from one implementation, hence it lives here rather than in either role.

Order: noise, then a dropout mask, then top-k pruning, identical in training and
inference (an attacker sees the same kind of features either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

NOISE_KINDS = ("gaussian", "laplace")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def obfuscation_checks(noise: Any, noise_kind: Any, dropout: Any, topk: Any) -> list[tuple[str, bool, str]]:
    """(field, valid, what it must be) for each setting; shared with the edge's DefenseConfig."""
    return [
        ("noise", finite(noise) and noise >= 0, "a finite number >= 0"),
        ("noise_kind", noise_kind in NOISE_KINDS, f"one of {NOISE_KINDS}"),
        ("dropout", finite(dropout) and 0 <= dropout < 1, "in [0, 1)"),
        ("topk", finite(topk) and 0 <= topk < 1, "in [0, 1)"),
    ]


@dataclass(frozen=True)
class ObfuscationConfig:
    noise: float = 0.0  # sigma: Gaussian std, or Laplace scale b
    noise_kind: str = "gaussian"
    dropout: float = 0.0  # p: share of features zeroed, no 1/(1-p) rescale
    topk: float = 0.0  # r: share of the smallest |features| zeroed per sample

    def __post_init__(self) -> None:
        for name, ok, expected in obfuscation_checks(self.noise, self.noise_kind, self.dropout, self.topk):
            if not ok:
                raise ValueError(f"ObfuscationConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ObfuscationConfig":
        """The obfuscation part of a defense record (e.g. the `defense` an encoder file holds);
        other keys (NoPeek, CEM) are training-time losses that never touch the wire."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


class Obfuscation(nn.Module):
    """noise -> dropout mask (no rescale) -> top-k pruning; the same in train and eval mode.

    Random draws come from `generator` when given (on its own device, then moved), so a
    run can be replayed exactly; otherwise from torch's global RNG.
    """

    def __init__(self, config: ObfuscationConfig, generator: torch.Generator | None = None) -> None:
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
