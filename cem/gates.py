"""The gating pieces of docs/CEM.md §2.4-2.6 and §3.4, written once for gated and slot.

A `GateBank` turns weighted statistics (mu, var) into the per-dimension penalty
psi = g * h * phi and owns the class gate. Two switches guard against the hazard of
docs/CEM.md §5.1 (gates trained to minimise the loss they gate can learn to close):
- `gates=False` is the simple variant: no soft / SNR gate, phi = the hard threshold;
- `learn_gates=False` makes the gates constants with respect to rob_loss: their
  parameters are frozen AND their inputs are detached, so neither the gate MLP nor
  the encoder can lower rob_loss by closing a gate; only phi (the thresholded log
  variance) carries gradient. Freezing the parameters alone would still let the
  encoder shift its statistics to close the soft or SNR gate.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def hidden_width(feature_dim: int) -> int:
    """H = min(512, max(64, D / 4)): the seeds' width for every small MLP here."""
    return min(512, max(64, feature_dim // 4))


def hard_threshold(var: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """relu(log(var + gamma) - log(tau + gamma)): exactly 0 below the threshold.

    Shared by the GMM surrogate and the gates-off variant; gamma keeps the log finite
    for dead dimensions and flattens the penalty for variances far below gamma.
    """
    return F.relu(torch.log(var + gamma) - math.log(tau + gamma))


def _scalar(value: float, learnable: bool) -> nn.Parameter:
    return nn.Parameter(torch.tensor(float(value)), requires_grad=learnable)


class GateBank(nn.Module):
    """Soft gate MLP + SNR gate + smooth threshold + class gate, with their scalars.

    `learnable_scalars` makes snr_thresh, snr_sharp, beta_sp, m parameters (the slot
    surrogate, docs/CEM.md §3.4) rather than constants (the gated one, §2.7).
    """

    def __init__(self, feature_dim: int, *, gates: bool = True, learn_gates: bool = True,
                 learnable_scalars: bool = False, snr_thresh: float = 0.3, snr_sharp: float = 10.0,
                 beta_sp: float = 1.0, margin: float = 0.1, class_gate_a: float = 10.0,
                 class_gate_b: float = 0.05, gamma: float = 0.01, eps: float = 1e-6) -> None:
        super().__init__()
        self.gates, self.learn_gates, self.gamma, self.eps = gates, learn_gates, gamma, eps
        hidden = hidden_width(feature_dim)
        self.soft = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, feature_dim)) if gates else None
        learn = learnable_scalars and learn_gates
        self.snr_thresh, self.snr_sharp = _scalar(snr_thresh, learn), _scalar(snr_sharp, learn)
        self.beta_sp, self.margin = _scalar(beta_sp, learn), _scalar(margin, learn)
        # The class gate multiplies the whole per-class loss, so rob_loss alone would train a
        # learnable a, b to close it: measured on digits (slot, gates off), G_c fell from 0.62
        # to 0.001 within two epochs and CEM stopped pulling. It down-weights classes barely in
        # the batch by design, so it stays a constant (docs/CEM.md §2.6).
        self.class_a, self.class_b = _scalar(class_gate_a, False), _scalar(class_gate_b, False)
        if not learn_gates and self.soft is not None:
            self.soft.requires_grad_(False)

    def penalty(self, mu: torch.Tensor, var: torch.Tensor, tau: float) -> tuple[torch.Tensor, dict[str, float]]:
        """psi = g * h * phi per dimension (same shape as var) and the gate means.

        var must already be clamped below by eps (the stats helpers do it).
        """
        if not self.gates:
            return hard_threshold(var, tau, self.gamma), {"soft_gate_mean": 1.0, "snr_gate_mean": 1.0}
        log_var = torch.log(var)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.learn_gates):
            g = torch.sigmoid(self.soft(log_var))
            h = torch.sigmoid(self.snr_sharp * (var / (mu.square() + self.eps) - self.snr_thresh))
        beta = self.beta_sp.clamp_min(1e-3)  # a learnable slope must not cross 0 (division)
        phi = F.softplus(beta * (log_var - math.log(tau) - self.margin)) / beta
        return g * h * phi, {"soft_gate_mean": float(g.detach().mean()), "snr_gate_mean": float(h.detach().mean())}

    def class_gate(self, shares: torch.Tensor) -> torch.Tensor:
        """G_c = sigmoid(a (p_c - b)): down-weights classes barely present in the batch."""
        return torch.sigmoid(self.class_a * (shares - self.class_b))
