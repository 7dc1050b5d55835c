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
    mean = FedAvg(base)
    for state, weight in zip(states, weights):
        mean.add(state, weight)
    return mean.result()


class FedAvg:
    """`fedavg` folded in one state at a time, so that a round's participants are averaged as
    their turns end and the driver holds one running sum, not a state per participant (a
    round of a thousand virtual clients). The variance is pooled from running sums of the
    weighted means and their squares, in float64."""

    def __init__(self, base: State) -> None:
        self.base, self.total = base, 0.0
        self._sums = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in base.items()
                      if t.is_floating_point()}
        self._squares = {_mean_of(name): torch.zeros_like(self._sums[name]) for name in self._sums
                         if name.endswith("running_var") and _mean_of(name) in self._sums}
        self._increments = {name: torch.zeros_like(t) for name, t in base.items() if not t.is_floating_point()}

    def add(self, state: State, weight: float) -> None:
        self.total += weight
        for name, total in self._sums.items():
            total += state[name].double() * weight
        for name, total in self._squares.items():
            total += state[name].double() ** 2 * weight
        for name, total in self._increments.items():
            total += state[name] - self.base[name]

    def result(self) -> State:
        if self.total <= 0:
            raise ValueError("fedavg weights must sum to > 0")
        averaged: State = {}
        for name, start in self.base.items():
            if not start.is_floating_point():
                averaged[name] = start + self._increments[name]
                continue
            pooled = self._sums[name] / self.total
            mean_name = _mean_of(name)
            if name.endswith("running_var") and mean_name in self._squares:
                mean = self._sums[mean_name] / self.total
                pooled = pooled + self._squares[mean_name] / self.total - mean ** 2
            averaged[name] = pooled.to(start.dtype)
        return averaged


def _mean_of(var_name: str) -> str:
    """The running mean beside a batch-norm running variance."""
    return var_name.removesuffix("running_var") + "running_mean"
