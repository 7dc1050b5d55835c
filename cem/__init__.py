"""Conditional-entropy (CEM) surrogates and the two-phase gradient merge; pure torch.

    surrogate = cem.build("slot", feature_dim, var_threshold=0.125)
    rob_loss, intra_mse, diag = surrogate(z, labels, sigma)
    cem.two_phase_backward(scale * rob_loss, task_backward, encoder.parameters(),
                           surrogate.parameters(), lam * cem.lr_weight(lr), features=z)

The math is docs/CEM.md; the choices it leaves open are stated where they are made.
"""

from __future__ import annotations

import inspect
from typing import Any

from cem.base import Surrogate, graph_zero
from cem.gated import GatedCEM
from cem.gmm import GMMCEM
from cem.merge import LR_POLICIES, is_active, join_optimizer, lr_weight, two_phase_backward
from cem.slot import SlotCEM

SURROGATES: dict[str, type[Surrogate]] = {"gmm": GMMCEM, "gated": GatedCEM, "slot": SlotCEM}

# What the edge runs unless told otherwise: attention_loss_scale, warm-up epochs (CEM active
# from epoch warmup + 1, counted from 1) and, for gated and slot, whether the soft and SNR
# gates are on. The seeds' values (gated: scale 0.1, gates on; slot: scale 0.25, gates on)
# pulled the encoder at a tenth of GMM's strength and moved nothing on digits; these are
# calibrated on digits at the paper's schedule (docs/CEM.md §4.1, docs/RESULTS.md).
DEFAULTS: dict[str, dict[str, float | int | bool]] = {
    "gmm": {"scale": 1.0, "warmup": 1},
    "gated": {"scale": 1.0, "warmup": 5, "gates": False},
    "slot": {"scale": 1.0, "warmup": 3, "gates": False},
}

# options a trainer may pass to any surrogate; each takes those that apply to it
# (e.g. num_classes and bounded only matter to gmm, gates and learn_gates only to gated / slot)
COMMON_OPTIONS = ("var_threshold", "learn_gates", "gates", "stats_on", "num_classes", "bounded")


def build(name: str, feature_dim: int, **options: Any) -> Surrogate:
    """Build a surrogate by name; options outside COMMON_OPTIONS must fit that surrogate."""
    cls = SURROGATES.get(name)
    if cls is None:
        raise ValueError(f"unknown CEM surrogate {name!r}; valid: {sorted(SURROGATES)}")
    params = inspect.signature(cls.__init__).parameters
    accepted = set(params) - {"self", "feature_dim"}
    missing = [k for k in accepted if params[k].default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"the {name!r} surrogate needs option(s) {sorted(missing)}")
    unknown = sorted(set(options) - accepted - set(COMMON_OPTIONS))
    if unknown:
        raise ValueError(f"options {unknown} do not apply to the {name!r} surrogate; it takes {sorted(accepted)}")
    return cls(feature_dim, **{k: v for k, v in options.items() if k in accepted})


__all__ = ["DEFAULTS", "LR_POLICIES", "SURROGATES", "GMMCEM", "GatedCEM", "SlotCEM", "Surrogate", "build",
           "graph_zero", "is_active", "join_optimizer", "lr_weight", "two_phase_backward"]
