"""Federated averaging of encoder states (the "fed" in SplitFed). Pure torch.

SplitFed (Thapa et al., 2022) trains the clients' encoders in parallel against the
server's decoder and then averages them, FedAvg-style, so that every client carries on
from one shared encoder.
"""

from __future__ import annotations

from typing import Sequence

import torch

State = dict[str, torch.Tensor]


def fedavg(states: Sequence[State], weights: Sequence[float], base: State) -> State:
    """The weighted mean of `states`, each of which started the round as `base`.

    Floating tensors (weights, and batch-norm running means and variances, which describe
    the data a client saw and are averaged like the weights) are weighted by `weights`:
    FedAvg weights a client by the samples it trained on, so a client with twice the data
    counts twice. Integer tensors are counters (batch norm's `num_batches_tracked`): a
    mean of counts counts nothing, so the result is the base count plus every client's
    increment, the number of batches the averaged statistics summarise. That is what
    batch norm with `momentum=None` (a cumulative average) divides by.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to > 0")
    averaged: State = {}
    for name, start in base.items():
        if start.is_floating_point():
            averaged[name] = sum(s[name].double() * (w / total) for s, w in zip(states, weights)).to(start.dtype)
        else:
            averaged[name] = start + sum(s[name] - start for s in states)
    return averaged
