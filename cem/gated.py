"""Gated attention CEM (docs/CEM.md §2): one attention pooling per class, then gated penalty.

All classes of the batch are processed at once: per-sample layers on the real rows,
per-class statistics on the padded [C, M, D] layout of `cem.stats.group_by_class`.
"""

from __future__ import annotations

import torch
from torch import nn

from cem.base import Diagnostics, Surrogate
from cem.gates import GateBank, hidden_width
from cem.stats import ClassGroups, weighted_mean_var

STATS_ON = ("raw", "normalized")


def check_stats_on(stats_on: str) -> str:
    if stats_on not in STATS_ON:
        raise ValueError(f"stats_on must be one of {STATS_ON}, got {stats_on!r}")
    return stats_on


class GatedAttentionPooling(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018): a = softmax_m(w . (tanh(V x) * sigmoid(U x)))."""

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.V, self.U, self.w = nn.Linear(feature_dim, hidden), nn.Linear(feature_dim, hidden), nn.Linear(hidden, 1)

    def forward(self, xn: torch.Tensor, groups: ClassGroups) -> torch.Tensor:
        """xn [N, D] (normalised kept samples) -> weights [C, M], each class's row summing to 1.

        The scores are per sample, so they are computed on the N real rows and only then
        laid out by class (padding gets -inf, hence weight 0) for the per-class softmax.
        """
        logits = self.w(torch.tanh(self.V(xn)) * torch.sigmoid(self.U(xn))).squeeze(-1)
        return groups.pad(logits, float("-inf")).softmax(-1)


class GatedCEM(Surrogate):
    """rob_loss = sum_c p_c G_c mean_d(g_d h_d phi_d) on attention-weighted class statistics."""

    def __init__(self, feature_dim: int, *, var_threshold: float = 0.125, learn_gates: bool = True,
                 stats_on: str = "raw", gates: bool = True, gamma: float = 0.01, eps: float = 1e-6,
                 snr_thresh: float = 0.3, snr_sharp: float = 10.0, beta_sp: float = 1.0, margin: float = 0.1,
                 class_gate_a: float = 10.0, class_gate_b: float = 0.05) -> None:
        super().__init__(feature_dim, var_threshold)
        self.stats_on, self.eps = check_stats_on(stats_on), eps
        self.norm = nn.LayerNorm(feature_dim)
        self.pool = GatedAttentionPooling(feature_dim, hidden_width(feature_dim))
        self.bank = GateBank(feature_dim, gates=gates, learn_gates=learn_gates, learnable_scalars=False,
                             snr_thresh=snr_thresh, snr_sharp=snr_sharp, beta_sp=beta_sp, margin=margin,
                             class_gate_a=class_gate_a, class_gate_b=class_gate_b, gamma=gamma, eps=eps)

    def _loss(self, groups: ClassGroups, sigma: float) -> tuple[torch.Tensor, torch.Tensor, Diagnostics]:
        x = groups.x
        xn = self.norm(groups.flat)
        a = self.pool(xn, groups).unsqueeze(1)  # [C, 1, M]
        mu, var = weighted_mean_var(groups.pad(xn) if self.stats_on == "normalized" else x, a, self.eps)
        mu, var = mu.squeeze(1), var.squeeze(1)  # [C, D]
        tau = self.var_threshold * sigma**2
        psi, gate_diag = self.bank.penalty(mu, var, tau)
        shares = groups.shares
        class_gate = self.bank.class_gate(shares)
        rob = (shares * class_gate * psi.mean(-1)).sum()
        with torch.no_grad():  # monitoring: unweighted MSE of the raw members around the pooled mean
            raw_mu = mu if self.stats_on == "raw" else (a @ x).squeeze(1)
            sq = (x - raw_mu.unsqueeze(1)).square().mean(-1) * groups.mask
            intra = (shares * sq.sum(-1) / groups.counts).sum()
        return rob, intra, {**gate_diag, "class_gate_mean": float(class_gate.detach().mean()),
                            "attn_max_mean": float(a.detach().amax(-1).mean())}
