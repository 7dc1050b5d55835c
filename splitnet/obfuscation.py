"""The obfuscation between the encoder and the wire: a contract of the edge and the attacker.

The edge applies it to every feature batch it sends; the noise-aware attacker applies
the same chain, with the settings the edge saved next to its encoder, to its own
training features, so that its inverse network learns on what the wire carries. Both
must draw from one implementation, hence it lives here rather than in either role.

Order: noise, then a dropout mask, then top-k pruning, identical in training and
inference (an attacker sees the same kind of features either way).
"""

from __future__ import annotations

import torch
from torch import nn

from splitnet.settings import ObfuscationConfig


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
