"""What every surrogate does around its own math: input checks, sigma = 0, NaN guard.

Subclasses implement `_loss(groups, sigma)` on a batch already grouped by class; this
base turns the call `module(features, labels, sigma)` into that and applies the rules
of docs/CEM.md §0.2 that hold for all three surrogates, so they are written once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cem.stats import ClassGroups, group_by_class

Diagnostics = dict[str, Any]  # plain floats / ints / bools only


def graph_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 that still has a graph, so callers can backward() it unconditionally.

    It hangs off the given tensors through nan_to_num, so a NaN input contributes a 0
    gradient rather than 0 * NaN = NaN. With nothing that requires grad, a fresh leaf.
    """
    parts = [t.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0 for t in tensors if t.requires_grad]
    if not parts:
        device = tensors[0].device if tensors else None
        return torch.zeros((), device=device, requires_grad=True)
    return torch.stack(parts).sum()


class Surrogate(nn.Module):
    """Base of the CEM surrogates: `forward(features, labels, sigma) -> (rob_loss, intra_mse, diag)`."""

    def __init__(self, feature_dim: int, var_threshold: float) -> None:
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be > 0, got {feature_dim}")
        if var_threshold <= 0:
            raise ValueError(f"var_threshold must be > 0, got {var_threshold}")
        self.feature_dim, self.var_threshold = feature_dim, var_threshold
        self.nan_count = 0  # cumulative: non-finite outputs replaced by 0

    def _loss(self, groups: ClassGroups, sigma: float) -> tuple[torch.Tensor, torch.Tensor, Diagnostics]:
        """rob_loss (graph), intra_mse (no graph needed) and the surrogate's own diagnostics."""
        raise NotImplementedError

    def _zero(self, z: torch.Tensor) -> torch.Tensor:
        return graph_zero(z, *(p for p in self.parameters() if p.requires_grad))

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                sigma: float) -> tuple[torch.Tensor, float, Diagnostics]:
        z, sigma = features.flatten(1), float(sigma)
        if z.shape[1] != self.feature_dim:
            raise ValueError(f"features flatten to {z.shape[1]} dims, surrogate built for {self.feature_dim}")
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape [{z.shape[0]}], got {tuple(labels.shape)}")
        diag: Diagnostics = {"active": False, "sigma_zero": sigma <= 0, "classes_used": 0, "nonfinite": False,
                             "shutoff": False}
        if sigma <= 0:  # no noise: nothing to hide the class spread under (docs/CEM.md §0.1)
            return self._zero(z), 0.0, {**diag, "nan_count": self.nan_count}
        groups = group_by_class(z, labels)
        diag["classes_used"] = len(groups)
        if len(groups) == 0:
            return self._zero(z), 0.0, {**diag, "nan_count": self.nan_count}
        diag["active"] = True  # a surrogate may override (GMM before its first refit)
        rob, intra, own = self._loss(groups, sigma)
        diag.update(own)
        intra_value = float(intra.detach())
        rob_bad, intra_bad = not bool(torch.isfinite(rob.detach())), not math.isfinite(intra_value)
        if rob_bad:
            rob = self._zero(z)
        if intra_bad:
            intra_value = 0.0
        if rob_bad or intra_bad:
            self.nan_count += 1
            diag["nonfinite"] = True
        return rob, intra_value, {**diag, "nan_count": self.nan_count}
