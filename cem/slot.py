"""Slot attention + gated cross attention CEM (docs/CEM.md §3): several sub-clusters per class.

Each class of the batch is one sequence; all classes run together. Per-sample layers
run on the real rows; set operations over a class's samples (slot competition,
mixture statistics) on the padded [C, M, D] layout, padding masked out of every sum.

Slots live in a `slot_dim` space (default H = hidden_width(D), not D): a GRU of width D
costs O(D^2) per slot and iteration, which for D = 8192 (VGG cut without bottleneck)
would be hundreds of millions of parameters. A linear read-out maps the slots back to
feature space for the cosine responsibilities of docs/CEM.md §3.3 (an identity when slot_dim = D).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

from cem.base import Diagnostics, Surrogate
from cem.gated import check_stats_on
from cem.gates import GateBank, hidden_width
from cem.stats import ClassGroups, weighted_mean_var

log = logging.getLogger(__name__)


class SlotAttention(nn.Module):
    """Locatello et al. 2020, batched over classes, with a sample mask and a given logit scale."""

    def __init__(self, feature_dim: int, slot_dim: int, num_slots: int, iters: int, hidden: int,
                 scale: float, eps: float = 1e-8) -> None:
        super().__init__()
        self.num_slots, self.iters, self.scale, self.eps = num_slots, iters, scale, eps
        self.to_k = nn.Linear(feature_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(feature_dim, slot_dim, bias=False)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.norm_slots, self.norm_mlp = nn.LayerNorm(slot_dim), nn.LayerNorm(slot_dim)
        self.mu = nn.Parameter(torch.randn(1, 1, slot_dim))
        self.log_sigma = nn.Parameter(torch.zeros(1, 1, slot_dim))
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, slot_dim))

    def forward(self, xn: torch.Tensor, groups: ClassGroups) -> torch.Tensor:
        """xn [N, D] layer-normed kept samples -> slots [C, S, slot_dim], one set per class."""
        k = groups.pad(self.to_k(xn) * self.scale)  # [C, M, slot_dim]; scaled once, not per iteration
        v = groups.pad(self.to_v(xn))
        c, dim = k.shape[0], self.mu.shape[-1]
        noise = torch.randn(c, self.num_slots, dim, device=xn.device, dtype=xn.dtype)
        slots = self.mu + self.log_sigma.exp() * noise
        keep = groups.mask.unsqueeze(-1).to(xn.dtype)
        for _ in range(self.iters):
            q = self.to_q(self.norm_slots(slots))
            attn = (k @ q.transpose(1, 2)).softmax(-1) + self.eps  # [C, M, S]: slots compete
            attn = attn * keep
            weights = attn / attn.sum(1, keepdim=True)  # renormalise over the class's samples
            updates = weights.transpose(1, 2) @ v  # [C, S, slot_dim]
            slots = self.gru(updates.reshape(-1, dim), slots.reshape(-1, dim)).view(c, self.num_slots, dim)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots


class GatedCrossAttention(nn.Module):
    """Flamingo's gated xattn-dense block: samples attend to slots; tanh gates start near identity."""

    def __init__(self, feature_dim: int, slot_dim: int, hidden: int, heads: int, gate_init: float) -> None:
        super().__init__()
        self.heads = math.gcd(hidden, heads)  # a head count that divides the inner width
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(feature_dim), nn.LayerNorm(slot_dim), \
            nn.LayerNorm(feature_dim)
        self.to_q = nn.Linear(feature_dim, hidden, bias=False)
        self.to_kv = nn.Linear(slot_dim, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, feature_dim)
        self.ffn = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, feature_dim))
        self.alpha_xattn = nn.Parameter(torch.tensor(gate_init))
        self.alpha_ffn = nn.Parameter(torch.tensor(gate_init))

    def forward(self, x: torch.Tensor, slots: torch.Tensor, groups: ClassGroups) -> torch.Tensor:
        """x [N, D] kept samples, slots [C, S, slot_dim] -> y [N, D].

        The projections and the FFN run on the N real rows; only the attention itself,
        where each sample looks at its own class's slots, uses the padded layout.
        """
        q = groups.pad(self.to_q(self.norm_q(x)))  # [C, M, hidden]
        (c, m, _), s = q.shape, slots.shape[1]
        q = q.view(c, m, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(slots)).view(c, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = groups.unpad(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(c, m, -1))
        y = x + torch.tanh(self.alpha_xattn) * self.out(att)
        return y + torch.tanh(self.alpha_ffn) * self.ffn(self.norm_ff(y))


class SlotCEM(Surrogate):
    """rob_loss = sum_c p_c G_c (1/D) sum_d sum_k w~_k psi_kd over slot-mixture statistics."""

    def __init__(self, feature_dim: int, *, var_threshold: float = 0.125, learn_gates: bool = True,
                 stats_on: str = "raw", gates: bool = True, num_slots: int = 8, iters: int = 3,
                 slot_dim: int | None = None, heads: int = 4, attn_scale: float | None = None,
                 xattn_gate_init: float = 0.1, beta: float = 10.0, slot_power: float = 2.0,
                 gamma: float = 0.01, eps: float = 1e-6, snr_thresh: float = 0.3, snr_sharp: float = 10.0,
                 beta_sp: float = 1.0, margin: float = 0.1, class_gate_a: float = 10.0, class_gate_b: float = 0.05,
                 early_shut_steps: int = 100, early_hard_thresh: float = 0.95, early_gate_thresh: float = 0.95,
                 early_momentum: float = 0.9) -> None:
        super().__init__(feature_dim, var_threshold)
        if num_slots < 1 or iters < 1:
            raise ValueError(f"num_slots and iters must be >= 1, got {num_slots}, {iters}")
        self.stats_on, self.eps, self.learn_gates = check_stats_on(stats_on), eps, learn_gates
        hidden = hidden_width(feature_dim)
        slot_dim = slot_dim or hidden
        self.norm = nn.LayerNorm(feature_dim)
        self.slots = SlotAttention(feature_dim, slot_dim, num_slots, iters, hidden,
                                   attn_scale if attn_scale is not None else slot_dim ** -0.25)
        self.xattn = GatedCrossAttention(feature_dim, slot_dim, hidden, heads, xattn_gate_init)
        self.norm_y = nn.LayerNorm(feature_dim)
        self.readout = nn.Identity() if slot_dim == feature_dim else nn.Linear(slot_dim, feature_dim)
        self.beta = nn.Parameter(torch.tensor(beta))
        self.slot_power = nn.Parameter(torch.tensor(slot_power), requires_grad=learn_gates)
        self.bank = GateBank(feature_dim, gates=gates, learn_gates=learn_gates, learnable_scalars=True,
                             snr_thresh=snr_thresh, snr_sharp=snr_sharp, beta_sp=beta_sp, margin=margin,
                             class_gate_a=class_gate_a, class_gate_b=class_gate_b, gamma=gamma, eps=eps)
        self.early_shut_steps, self.early_momentum = early_shut_steps, early_momentum
        self.early_hard_thresh, self.early_gate_thresh = early_hard_thresh, early_gate_thresh
        # buffers, so that a checkpoint restores the shut-off state along with the weights
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("snr_running", torch.tensor(float("nan")))
        self.register_buffer("soft_running", torch.tensor(float("nan")))
        self._shut: bool | None = None

    def _loss(self, groups: ClassGroups, sigma: float) -> tuple[torch.Tensor, torch.Tensor, Diagnostics]:
        xn = self.norm(groups.flat)
        slots = self.slots(xn, groups)
        y = self.xattn(groups.flat, slots, groups)
        cos = groups.pad(F.normalize(self.norm_y(y), dim=-1)) @ F.normalize(self.readout(slots), dim=-1).mT
        resp = (self.beta * cos).softmax(-1) * groups.mask.unsqueeze(-1)  # [C, M, S], padded rows 0
        mass = resp.sum(1)  # w_k [C, S]
        weights = (resp / mass.clamp_min(self.eps).unsqueeze(1)).transpose(1, 2)  # [C, S, M]
        mu, var = weighted_mean_var(groups.pad(xn) if self.stats_on == "normalized" else groups.x, weights,
                                    self.eps)
        psi, gate_diag = self.bank.penalty(mu, var, self.var_threshold * sigma**2)  # [C, S, D]
        share = (mass / groups.counts.unsqueeze(1)).clamp_min(self.eps)  # w_k / M
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.learn_gates):
            slot_w = (self.slot_power * share.log()).softmax(-1)  # (w_k/M)^g / sum_k' (w_k'/M)^g
        shares = groups.shares
        class_gate = self.bank.class_gate(shares)
        rob = (shares * class_gate * (slot_w * psi.mean(-1)).sum(-1)).sum()
        with torch.no_grad():  # monitoring: responsibility-weighted MSE around the slot means
            intra = (shares * (share * var.mean(-1)).sum(-1)).sum()
        shut, early = self._update_shutoff(gate_diag)
        if shut:
            rob = rob * 0.0
        return rob, intra, {**gate_diag, **early, "class_gate_mean": float(class_gate.detach().mean()),
                            "slot_weight_max": float(slot_w.detach().amax(-1).mean()),
                            "beta": float(self.beta.detach()), "slot_power": float(self.slot_power.detach())}

    def _update_shutoff(self, gate_diag: dict[str, float]) -> tuple[bool, Diagnostics]:
        """Early shut-off of docs/CEM.md §3.7: by call count, or while the running gate means are too high."""
        self.calls += 1
        for buf, key in ((self.snr_running, "snr_gate_mean"), (self.soft_running, "soft_gate_mean")):
            value = torch.tensor(gate_diag[key], dtype=buf.dtype)
            buf.copy_(value if buf.isnan() else self.early_momentum * buf + (1 - self.early_momentum) * value)
        calls = int(self.calls)
        reasons = {
            "shutoff_steps": calls <= self.early_shut_steps,
            # the gate conditions only mean something when there are gates (not in the simple variant)
            "shutoff_snr": self.bank.gates and float(self.snr_running) > self.early_hard_thresh,
            "shutoff_gate": self.bank.gates and float(self.soft_running) > self.early_gate_thresh,
        }
        shut = any(reasons.values())
        if shut != self._shut:
            why = ", ".join(k for k, v in reasons.items() if v) or "conditions cleared"
            log.info("[CEM-GATE] slot CEM %s at call %d (%s; snr gate %.3f, soft gate %.3f)",
                     "shut off" if shut else "enabled", calls, why, float(self.snr_running),
                     float(self.soft_running))
            self._shut = shut
        return shut, {**reasons, "shutoff": shut, "calls": calls, "snr_gate_running": float(self.snr_running),
                      "soft_gate_running": float(self.soft_running)}
