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

    Floating tensors (weights, and batch-norm running means) are weighted by `weights`:
    FedAvg weights a client by the samples it trained on, so a client with twice the data
    counts twice. A batch-norm running variance is pooled by the law of total variance,
    the weighted mean of the clients' variances plus the spread of their means about the
    pooled mean: with clients whose data differ (a Dirichlet partition) the plain mean of
    variances would understate the variance of their union. Integer tensors are counters
    (batch norm's `num_batches_tracked`): a mean of counts counts nothing, so the result
    is the base count plus every client's increment, the number of batches the averaged
    statistics summarise. That is what batch norm with `momentum=None` (a cumulative
    average) divides by.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to > 0")
    shares = [w / total for w in weights]
    means = {name: sum(s[name].double() * share for s, share in zip(states, shares))
             for name, start in base.items() if start.is_floating_point()}
    averaged: State = {}
    for name, start in base.items():
        if not start.is_floating_point():
            averaged[name] = start + sum(s[name] - start for s in states)
            continue
        pooled = means[name]
        mean_name = name.removesuffix("running_var") + "running_mean"
        if name.endswith("running_var") and mean_name in means:
            pooled = pooled + sum((s[mean_name].double() - means[mean_name]) ** 2 * share
                                  for s, share in zip(states, shares))
        averaged[name] = pooled.to(start.dtype)
    return averaged
