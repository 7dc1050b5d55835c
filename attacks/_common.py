"""Plumbing the attacks share: seeding, freezing the target, and one training loop.

Two guarantees live here so each attack cannot forget them. Randomness comes from a
forked, seeded generator state, so a run is reproducible and the caller's global RNG is
left as it was. The models under attack are run in eval mode (batch-norm statistics
must not move) and gradients are taken only with respect to the attacker's own
parameters (`torch.autograd.grad`), so not even a target's `.grad` is touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

Obfuscate = Callable[[Tensor], Tensor]  # the edge's defense applied to features (noise, dropout, top-k)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then each module's own mode back."""
    with ExitStack() as stack:
        for module in modules:
            stack.callback(module.train, module.training)
            module.eval()
        yield


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def as_dataset(data: Tensor | Dataset) -> Dataset:
    """Accept a bare image tensor or any dataset whose items start with the image."""
    return TensorDataset(data) if isinstance(data, Tensor) else data


def shuffled(data: Tensor | Dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(as_dataset(data), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def fit(params: Iterable[Tensor], batch_loss: Callable[[list[Tensor]], Tensor], loader: DataLoader, epochs: int,
        lr: float, progress: bool, desc: str) -> list[float]:
    """Adam with per-step cosine decay to zero; returns each epoch's mean loss (what a run records)."""
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch")
    for _ in bar:
        total, seen, start = 0.0, 0, time.perf_counter()
        for batch in loader:
            loss = batch_loss(batch)
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch[0])
            seen += len(batch[0])
        epoch_loss = total / seen
        history.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4g}", img_per_s=f"{seen / (time.perf_counter() - start):.0f}")
    return history
