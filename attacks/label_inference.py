"""Label inference from the gradients a U-shaped split's edge sends to the cloud (pure torch).

In a U-shaped split (Vepakomma et al. 2018) the edge keeps the classifier head and the loss,
so labels never cross the wire; the cloud still receives dLoss/d(middle output), one row per
example. Li et al. ("Label Leakage and Protection in Two-party Split Learning", ICLR 2022)
show those rows give the labels away: by their norm (the minority class of an imbalanced
binary task is predicted worse, so its loss gradient is larger) and by their direction
(softmax cross-entropy's gradient p - onehot(y) points away from the true class's logit, and
the head maps that to one direction per class). This module scores both.

Every function takes rows: one batch, or the rows of many steps concatenated. The
direction attack clusters all the rows it is given, so across steps it assumes the head
moved little between them (true late in training and over a few steps); the cosine
score compares rows with one reference row and is meant per batch, where the reference
came from the same model.

scikit-learn and scipy (the attack role's dependencies) do the k-means, the matching
and the AUC; nothing here re-implements them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score
from torch import Tensor

KNOWN_PER_CLASS = 1  # labels the attacker knows per class: one suffices with the matching below


def norm_scores(grads: Tensor) -> Tensor:
    """Per-example L2 norm of each row of `grads` [B, ...]: Li et al.'s norm attack score."""
    return grads.flatten(1).double().norm(dim=1)


def cosine_scores(grads: Tensor, reference: Tensor) -> Tensor:
    """Cosine similarity of each row of `grads` [B, ...] with one `reference` gradient.

    Li et al.'s cosine attack: with the reference an example whose label the attacker knows,
    a positive cosine says "same class". The reference must come from the same batch (the
    same model): across steps the head moves and old directions go stale.
    """
    rows = grads.flatten(1).double()
    return torch.nn.functional.cosine_similarity(rows, reference.flatten().double().unsqueeze(0), dim=1)


def leak_auc(scores: Tensor, labels: Tensor, positive: int = 1) -> float:
    """Li et al.'s leak AUC: how well `scores` [B] rank the `positive` class above the others.

    Reported as max(auc, 1 - auc), in [0.5, 1]: 0.5 means the score tells nothing, 1 that it
    separates the classes. A score ranking the classes the wrong way round leaks exactly as much,
    and one known label tells the attacker which way round it is; the raw AUC would instead read
    a perfect leak as 0 and make attacks and defenses hard to compare. scikit-learn takes the
    raw scores (torchmetrics' binary_auroc would squash scores outside [0, 1] through a
    sigmoid, tying large norms).
    """
    target = (labels.flatten() == positive).cpu().numpy()
    if target.all() or not target.any():
        raise ValueError(f"leak_auc needs examples of class {positive} and of another class, "
                         f"got {int(target.sum())} of {target.size}")
    auc = float(roc_auc_score(target, scores.flatten().double().cpu().numpy()))
    return max(auc, 1.0 - auc)


@dataclass(frozen=True)
class LabelRecovery:
    """How well an attack recovered the labels it did not know."""

    accuracy: float  # share of the unknown examples labelled correctly
    known: int  # labels the attacker was given
    recall: tuple[float, ...]  # per class, over its unknown examples (nan for a class with none)


def pick_known(labels: Tensor, per_class: int = KNOWN_PER_CLASS, seed: int = 0) -> Tensor:
    """A boolean mask of `per_class` random examples of each class: the labels the attacker knows
    (e.g. its own examples among the edge's, or a few it labelled by hand)."""
    generator = torch.Generator().manual_seed(seed)
    known = torch.zeros(labels.numel(), dtype=torch.bool)
    for label in labels.unique():
        where = (labels.flatten() == label).nonzero().flatten()
        known[where[torch.randperm(where.numel(), generator=generator)[:per_class]]] = True
    return known


def direction_attack(grads: Tensor, labels: Tensor, known: Tensor, num_classes: int,
                     seed: int = 0) -> LabelRecovery:
    """Cluster the gradient directions into `num_classes` groups and name each group's class.

    Rows are scaled to unit length, so k-means' Euclidean distance orders pairs as the cosine
    does (spherical k-means, approximately). Each cluster is then matched one-to-one to a class
    by the Hungarian method on the counts of known labels in it (most agreement); a cluster
    holding no known label takes the class the matching leaves for it, so the attacker needs no
    known label in every cluster. `labels` are the truth: read only where `known` is set, and
    to score the rest.
    """
    units = torch.nn.functional.normalize(grads.flatten(1).double(), dim=1).cpu().numpy()
    clusters = KMeans(n_clusters=num_classes, n_init=10, random_state=seed).fit_predict(units)
    cluster_class = _match_clusters(clusters, labels.flatten().cpu().numpy(), known.cpu().numpy(), num_classes)
    predicted = torch.as_tensor(cluster_class[clusters])
    return _score(predicted, labels.flatten().cpu(), known.cpu(), num_classes)


def nearest_known_attack(grads: Tensor, labels: Tensor, known: Tensor, num_classes: int) -> LabelRecovery:
    """Li et al.'s cosine attack for several classes: each unknown example takes the label of the
    known example whose gradient is most aligned with its own. Per batch, like `cosine_scores`."""
    rows = torch.nn.functional.normalize(grads.flatten(1).double(), dim=1)
    similarity = rows @ rows[known].T
    predicted = labels.flatten()[known][similarity.argmax(dim=1)].cpu()
    return _score(predicted, labels.flatten().cpu(), known.cpu(), num_classes)


def _match_clusters(clusters: np.ndarray, labels: np.ndarray, known: np.ndarray, num_classes: int) -> np.ndarray:
    """The class of each cluster: the one-to-one assignment agreeing with the most known labels."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clusters[known], labels[known]), 1)
    rows, columns = linear_sum_assignment(counts, maximize=True)
    cluster_class = np.empty(num_classes, dtype=np.int64)
    cluster_class[rows] = columns
    return cluster_class


def _score(predicted: Tensor, labels: Tensor, known: Tensor, num_classes: int) -> LabelRecovery:
    unknown = ~known
    hits = predicted[unknown] == labels[unknown]
    recall = tuple(float(hits[labels[unknown] == c].double().mean()) if (labels[unknown] == c).any() else float("nan")
                   for c in range(num_classes))
    return LabelRecovery(accuracy=float(hits.double().mean()), known=int(known.sum()), recall=recall)
