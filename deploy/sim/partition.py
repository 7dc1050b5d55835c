"""Split a training set into per-client shards: IID, or label-skewed with a Dirichlet prior.

Pure (torch and numpy, no Ray, no gRPC) so the partitions can be tested and reused by
sweeps without a cluster. Shards are lists of indices into the training set: the
driver computes them once from the labels and each Ray actor loads the data set and
takes its own `Subset`, so no image crosses the object store.

Dirichlet partitioning is the usual way to simulate non-IID federated clients
(Hsu et al., "Measuring the effects of non-identical data distribution", 2019): for
each class, the fractions of its samples that go to each client are drawn from
Dir(alpha, ..., alpha). A small alpha gives each client a few dominant classes; a large
one tends to the IID split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from deploy.sim.config import PartitionSpec
from splitnet import data


def split(labels: torch.Tensor, count: int, spec: PartitionSpec, seed: int = 0) -> list[list[int]]:
    """`count` disjoint, non-empty index lists that together cover every sample."""
    n = len(labels)
    if count < 1 or count > n:
        raise ValueError(f"cannot split {n} samples among {count} clients")
    if spec.kind == "iid":
        # The project's one definition of an IID shard (`splitnet.data.shard`), so code that
        # shards by hand and a Ray run with the same seed agree on who holds which sample.
        # The permutation is drawn once: `shard` draws it per call, which for 10,000 clients of
        # CIFAR-10's 50,000 samples is 10,000 permutations of 50,000 (minutes of the driver's start).
        perm = data.shard(TensorDataset(labels), 0, 1, seed).indices
        return [perm[i::count] for i in range(count)]
    return _dirichlet(labels.numpy(), count, spec.alpha, seed)


def _dirichlet(labels: np.ndarray, count: int, alpha: float, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(count)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(count, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.extend(chunk.tolist())
    # A tiny alpha can leave a client with nothing; an empty client cannot train or be
    # averaged, so it takes one sample from the largest shard (deterministic, unlike
    # redrawing until every client happens to get something).
    # count <= len(labels), so while a shard is empty the largest holds at least two.
    for part in parts:
        if not part:
            part.append(max(parts, key=len).pop())
    return [sorted(p) for p in parts]


def label_skew(labels: torch.Tensor, parts: list[list[int]]) -> float:
    """Mean total-variation distance between each shard's label histogram and the whole set's.

    0 when every shard has the global class mix; near 1 when each holds one rare class.
    """
    classes = int(labels.max()) + 1
    overall = torch.bincount(labels, minlength=classes).double()
    overall /= overall.sum()
    distances = []
    for part in parts:
        hist = torch.bincount(labels[part], minlength=classes).double()
        distances.append(0.5 * float((hist / hist.sum() - overall).abs().sum()))
    return sum(distances) / len(distances)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The class label of every sample, without decoding images where the set keeps them apart."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    targets = getattr(dataset, "targets", None)  # torchvision sets and ImageFolder
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]
