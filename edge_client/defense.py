"""The edge's feature defenses (ATTACKS_AND_METRICS.md "Defenses"); pure torch.

`Obfuscation` is what stands between the encoder and the wire: noise, then a dropout
mask, then top-k pruning, identical in training and inference (an attacker sees the
same kind of features either way). NoPeek and CEM are training-time losses: NoPeek is
`nopeek_loss` here, CEM lives in the `cem` package and is configured by DefenseConfig.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_client.config import DefenseConfig


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
