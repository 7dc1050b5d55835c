"""The edge's feature defenses (docs/ATTACKS_AND_METRICS.md §3); pure torch.

`DefenseConfig` (in `edge_client.config`, free of torch) holds all of them. The obfuscation
between the encoder and the wire (noise, dropout, top-k) is `splitnet.obfuscation`, shared
with the noise-aware attacker. NoPeek and CEM are training-time losses: NoPeek is
`nopeek_loss` here, CEM lives in the `cem` package.
"""

from __future__ import annotations

import torch


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
