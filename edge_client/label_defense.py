"""Noise the edge adds to the gradient it sends up in a U-shaped split, against label inference.

The edge holds the head and the loss; the cloud receives dLoss/d(middle output), one row per
example, and can read the labels from the rows' norms and directions (Li et al., "Label
Leakage and Protection in Two-party Split Learning", ICLR 2022). Each defense here maps that
batch of rows [B, ...] to a noised batch of the same shape and dtype; randomness comes from
the caller's torch.Generator only, so a seeded run sends the same noise again. The noise is
drawn in float64 and cast back, so a half-precision wire changes nothing but the last cast.

The defenses trade the cloud's training signal for privacy: the cloud trains on the noised
gradient, so every bit of noise also slows the middle's learning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from edge_client.config import LABEL_DEFENSES, WITHOUT_STRENGTH
from splitnet.settings import finite, require_fields

MARVELL_STEPS = 100  # L-BFGS iterations for Marvell's four noise variances; it settles within ~20


@dataclass(frozen=True)
class LabelDefense:
    """Which defense the edge applies to the gradient it sends up, and how hard.

    strength: gaussian, the expected noise norm relative to the batch's mean gradient norm;
    marvell, the noise power relative to the squared distance of the two classes' mean
    gradients; none and max_norm take none (0).
    """

    kind: str = "none"
    strength: float = 0.0

    def __post_init__(self) -> None:
        require_fields(self, [
            ("kind", self.kind in LABEL_DEFENSES, f"one of {LABEL_DEFENSES}"),
            ("strength", finite(self.strength) and self.strength >= 0, "a finite number >= 0"),
            ("strength", self.kind not in WITHOUT_STRENGTH or self.strength == 0,
             f"0 for kind {self.kind!r} (it takes no strength)"),
        ])

    def apply(self, grads: Tensor, generator: torch.Generator, labels: Tensor | None = None) -> Tensor:
        """The defended gradient. `labels` (the edge's own, 0/1) only for marvell, which shapes
        its noise by class."""
        if self.kind == "gaussian":
            return gaussian(grads, generator, self.strength)
        if self.kind == "max_norm":
            return max_norm(grads, generator)
        if self.kind == "marvell":
            if labels is None:
                raise ValueError("LabelDefense(kind='marvell') needs the batch's labels")
            return marvell(grads, labels, generator, self.strength)
        return grads


def gaussian(grads: Tensor, generator: torch.Generator, strength: float) -> Tensor:
    """Isotropic noise N(0, sigma^2 I), sigma = strength * mean_j ||g_j|| / sqrt(d).

    Relative to the batch's mean gradient norm so that one strength means the same thing as the
    gradients shrink during training: the noise's expected norm (sigma * sqrt(d) for d features)
    is `strength` times that mean, so 1 buries a typical example's gradient in noise as large.
    """
    rows = grads.flatten(1).double()
    sigma = strength * rows.norm(dim=1).mean() / math.sqrt(rows.shape[1])
    return _cast(rows + sigma * _normal(rows, generator), grads)


def max_norm(grads: Tensor, generator: torch.Generator) -> Tensor:
    """Li et al.'s max-norm heuristic: each example gets Gaussian noise with
    sigma_j = sqrt(max_k ||g_k||^2 - ||g_j||^2) / sqrt(d), so that every row's expected squared
    norm equals the batch's largest. The norm attack then sees one norm for every example; the
    largest gradient travels unchanged, and directions are left as they are."""
    rows = grads.flatten(1).double()
    squared = rows.square().sum(dim=1)
    sigma = (squared.max() - squared).clamp_min(0).sqrt() / math.sqrt(rows.shape[1])
    return _cast(rows + sigma.unsqueeze(1) * _normal(rows, generator), grads)


def marvell(grads: Tensor, labels: Tensor, generator: torch.Generator, strength: float) -> Tensor:
    """Marvell (Li et al.): per-class Gaussian noise of bounded power that minimises how well
    any attacker can tell the two classes' gradient distributions apart, for binary tasks.

    Li et al. model each class's gradients as N(mean_k, s_k I) (s_k: its per-feature variance) and
    bound every attack's leak AUC by the symmetrised KL divergence between the two noised
    distributions. The optimal noise covariance of class k is, they show, lambda_k along the
    difference of the class means plus mu_k spread evenly over the d - 1 orthogonal directions;
    the four variances minimise that divergence under the power budget
    p * (lambda_1 + mu_1) + (1 - p) * (lambda_0 + mu_0) = strength * ||mean_1 - mean_0||^2
    (p: share of class 1). They solve the four-variable problem with a solver of their own; here
    L-BFGS over a softmax split of the budget, which meets the budget exactly by construction.
    A batch of one class has no difference to hide and is returned as it is.
    """
    rows, labels = grads.flatten(1).double(), labels.flatten()
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"marvell protects binary labels (0/1), got {labels.unique().tolist()}")
    if rows.shape[1] < 2:
        raise ValueError("marvell needs gradients of at least 2 features")
    positive = labels == 1
    if strength == 0 or positive.all() or not positive.any():
        return grads
    mean1, mean0 = rows[positive].mean(0), rows[~positive].mean(0)
    gap = (mean1 - mean0).square().sum()
    if gap == 0:
        return grads
    direction = (mean1 - mean0) / gap.sqrt()
    spread1 = (rows[positive] - mean1).square().sum(1).mean() / rows.shape[1] / gap
    spread0 = (rows[~positive] - mean0).square().sum(1).mean() / rows.shape[1] / gap
    along, across = _marvell_variances(float(positive.double().mean()), float(spread1), float(spread0),
                                       strength, rows.shape[1])
    along, across = gap * along[positive.long()], gap * across[positive.long()]  # per row, by its class
    z = _normal(rows, generator)
    on_direction = z @ direction
    noise = (along.sqrt() * on_direction).unsqueeze(1) * direction \
        + (across / (rows.shape[1] - 1)).sqrt().unsqueeze(1) * (z - on_direction.unsqueeze(1) * direction)
    return _cast(rows + noise, grads)


def _marvell_variances(share1: float, spread1: float, spread0: float, power: float,
                       dim: int) -> tuple[Tensor, Tensor]:
    """(lambda_0, lambda_1), (mu_0, mu_1), in units of ||mean_1 - mean_0||^2: the noise variances
    along the class-mean difference and the total across it, per class, minimising the
    symmetrised KL divergence of the two noised classes (Li et al.'s objective)."""
    cost = torch.tensor([1 - share1, share1, 1 - share1, share1], dtype=torch.float64)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    spread = torch.tensor([spread0, spread1], dtype=torch.float64)

    def variances() -> tuple[Tensor, Tensor]:
        split = power * torch.softmax(logits, 0) / cost
        return split[:2], split[2:]

    def divergence() -> Tensor:
        along, across = variances()
        a = spread + along  # each class's variance along the difference ...
        b = spread + across / (dim - 1)  # ... and per direction across it
        return (a[1] / a[0] + a[0] / a[1] - 2 + (dim - 1) * (b[1] / b[0] + b[0] / b[1] - 2)
                + 1 / a[0] + 1 / a[1]) / 2

    optimiser = torch.optim.LBFGS([logits], max_iter=MARVELL_STEPS, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = divergence()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    along, across = variances()
    return along.detach(), across.detach()


def _normal(rows: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(rows.shape, generator=generator, dtype=torch.float64, device=rows.device)


def _cast(rows: Tensor, grads: Tensor) -> Tensor:
    return rows.reshape(grads.shape).to(grads.dtype)
