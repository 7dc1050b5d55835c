"""Batch bookkeeping shared by the surrogates: grouping by class and weighted moments.

Every surrogate works class by class. Looping over classes in Python costs one small
kernel launch per class and per op; instead the batch is laid out once as a padded
[C, M, D] block with a mask, so that all classes are processed by the same batched ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassGroups:
    """A batch regrouped by class; only classes with at least `min_count` samples.

    Two views of the kept samples: `flat` rows in batch order, for per-sample layers
    (no padding rows to pay for), and the padded `x` block, for per-class set
    operations; `pad` moves any per-sample result from the first view to the second.
    """

    flat: torch.Tensor  # [N, D], the kept samples in batch order
    sample_class: torch.Tensor  # [N] long, each kept sample's class position in [0, C)
    sample_rank: torch.Tensor  # [N] long, its position inside its class, in [0, M)
    x: torch.Tensor  # [C, M, D], padded with zeros
    mask: torch.Tensor  # [C, M] bool, True where a real sample sits
    counts: torch.Tensor  # [C] long, samples per kept class
    classes: torch.Tensor  # [C] long, the label of each kept class
    batch_size: int  # B, the whole batch (skipped classes included): p_c = counts / B

    @property
    def shares(self) -> torch.Tensor:
        """p_c = M_c / B, as a float tensor on x's device."""
        return self.counts.to(self.x.dtype) / self.batch_size

    def pad(self, rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-sample values [N, ...] (rows of `flat`) -> [C, M, ...], `fill` where padded."""
        out = rows.new_full((*self.mask.shape, *rows.shape[1:]), fill)
        return out.index_put((self.sample_class, self.sample_rank), rows)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """The inverse of `pad`: [C, M, ...] -> the real samples' rows [N, ...]."""
        return padded[self.sample_class, self.sample_rank]

    def __len__(self) -> int:
        return int(self.counts.numel())


def group_by_class(z: torch.Tensor, labels: torch.Tensor, min_count: int = 2) -> ClassGroups:
    """Regroup the rows of z [B, D] by class, into a padded [C, M, D] block and its index.

    Classes with fewer than `min_count` samples are dropped (the spec skips M <= 1: a
    single sample has no variance to penalise). Differentiable in z.
    """
    labels = labels.to(z.device).long()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    keep = counts >= min_count
    # rank of each sample inside its class: stable sort by class, then position - class start
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inverse)
    rank[order] = torch.arange(inverse.numel(), device=z.device) - starts[inverse[order]]
    new_index = torch.cumsum(keep.long(), 0) - 1  # old class slot -> kept class slot
    sample_kept = keep[inverse]
    ci, ri = new_index[inverse][sample_kept], rank[sample_kept]
    kept_counts = counts[keep]
    width = int(kept_counts.max()) if kept_counts.numel() else 0
    mask = torch.zeros(len(kept_counts), width, dtype=torch.bool, device=z.device)
    mask[ci, ri] = True
    flat = z[sample_kept]
    x = flat.new_zeros(len(kept_counts), width, z.shape[1]).index_put((ci, ri), flat)
    return ClassGroups(flat, ci, ri, x, mask, kept_counts, classes[keep], int(labels.numel()))


def weighted_mean_var(x: torch.Tensor, weights: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and per-dimension variance of samples under K weightings at once.

    x: [..., M, D]; weights: [..., K, M], each row summing to 1 over M. Returns mu and
    var, both [..., K, D], var clamped below by eps (log var follows in every caller).
    Computed as E_w[(x - c)^2] - (mu - c)^2 around a shift c inside the data (the mean of
    the K weighted means): two matmuls instead of a [..., K, M, D] block of deviations
    (the slot surrogate's main cost), and, unlike the unshifted E[x^2] - mu^2, no
    catastrophic cancellation for features in [0, 1] whose means (~0.5) dwarf their
    variances (~1e-3, the noise threshold).
    """
    c = weights.mean(-2, keepdim=True) @ x  # [..., 1, D]
    xc = x - c
    mu_c = weights @ xc
    var = weights @ xc.square() - mu_c.square()
    return mu_c + c, var.clamp_min(eps)
