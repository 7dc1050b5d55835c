"""The original GMM surrogate (docs/CEM.md §1): per-class k-means at epoch end, per-batch penalty.

The clusters are fitted on the whole training set (eval-mode features) by `refit`, and
the per-batch term blends the batch's cluster spread with the epoch's spread s2_ck,
trusting the batch more when it holds more of the cluster (alpha).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from cem.base import Diagnostics, Surrogate, graph_zero
from cem.gates import hard_threshold
from cem.stats import ClassGroups, group_by_class


def kmeans_pp(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on the global torch RNG, so seeds reproduce."""
    centers = [x[torch.randint(len(x), (1,), device=x.device)].squeeze(0)]
    d2 = (x - centers[0]).square().sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / len(d2))  # all points coincide
        centers.append(x[torch.multinomial(probs, 1)].squeeze(0))
        d2 = torch.minimum(d2, (x - centers[-1]).square().sum(-1))
    return torch.stack(centers)


def lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd iterations until the assignment stops changing; an emptied cluster is re-seeded at
    the point farthest from its centre, so every cluster keeps members (weights stay > 0)."""
    assign = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        d2 = torch.cdist(x, centers).square()
        new = d2.argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=len(centers))
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        centers = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), centers)
        own_d2 = d2.gather(1, assign.unsqueeze(1)).squeeze(1)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = own_d2.argmax()
            centers[empty], assign[far], own_d2[far] = x[far], empty, -1.0
    return centers, assign, iterations


class GMMCEM(Surrogate):
    """rob_loss = mean_c sum_k w_ck relu(log(v_ck + gamma) - log(tau + gamma)), clusters from `refit`."""

    def __init__(self, feature_dim: int, *, num_classes: int, var_threshold: float = 0.125,
                 bounded: bool = False, gamma: float = 0.01, stats_on: str = "raw", max_iter: int = 50) -> None:
        super().__init__(feature_dim, var_threshold)
        if stats_on != "raw":
            raise ValueError(f"stats_on={stats_on!r}: the gmm surrogate works on raw features only")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.gamma, self.max_iter = num_classes, gamma, max_iter
        self.clusters = 5 if bounded else 15  # sigmoid-bounded features: fewer, wider modes
        self.register_buffer("centroids", torch.zeros(num_classes, self.clusters, feature_dim))
        self.register_buffer("weights", torch.zeros(num_classes, self.clusters))  # w_ck = n_ck / N_c
        self.register_buffer("spread", torch.zeros(num_classes, self.clusters))  # s2_ck
        self.register_buffer("nbar", torch.zeros(()))  # Nbar_c = num_batches * B / num_classes
        self.register_buffer("refits", torch.zeros((), dtype=torch.long))
        self.register_buffer("logdet_per_dim", torch.tensor(float("nan")))

    @torch.no_grad()
    def refit(self, features_all: torch.Tensor, labels_all: torch.Tensor, sigma: float) -> Diagnostics:
        """Epoch-end k-means per class: k-means++ the first time, warm-started from the last
        centroids after. Skipped without noise (CEM is inactive then, and tau = 0)."""
        if sigma <= 0:
            return {"refit": False, "sigma_zero": True}
        z = features_all.flatten(1).detach().to(self.centroids)
        labels = labels_all.to(z.device).long()
        if z.shape[1] != self.feature_dim:
            raise ValueError(f"features flatten to {z.shape[1]} dims, surrogate built for {self.feature_dim}")
        warm = int(self.refits) > 0
        seen = self.weights.sum(-1) > 0  # classes with centroids to warm-start from
        self.nbar.fill_(len(z) / self.num_classes)  # one epoch = all samples: num_batches * B = N
        self.weights.zero_()
        self.spread.zero_()
        iterations, logdets = 0, []
        for c in range(self.num_classes):
            xc = z[labels == c]
            if len(xc) == 0:
                continue
            k = min(self.clusters, len(xc))
            start = self.centroids[c, :k] if bool(seen[c]) else kmeans_pp(xc, k)
            centers, assign, its = lloyd(xc, start.clone(), self.max_iter)
            iterations = max(iterations, its)
            dev = xc - centers[assign]
            counts = torch.bincount(assign, minlength=k).to(z.dtype)
            self.centroids[c, :k] = centers
            self.weights[c, :k] = counts / len(xc)
            self.spread[c, :k] = torch.zeros(k, device=z.device).index_add_(0, assign, dev.square().mean(1)) / counts
            logdets.append((self.weights[c, :k] * self._logdet(dev, assign, sigma, k)).sum() / self.feature_dim)
        self.refits += 1
        self.logdet_per_dim.copy_(torch.stack(logdets).mean() if logdets else torch.tensor(float("nan")))
        return {"refit": True, "warm_start": warm, "iterations": iterations, "clusters": self.clusters,
                "spread_mean": float(self.spread[self.weights > 0].mean()),
                "logdet_per_dim": float(self.logdet_per_dim)}

    @staticmethod
    def _logdet(dev: torch.Tensor, assign: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
        """log det(Sigma_k + sigma^2 I) for each of the k clusters, logged as in the original, never
        optimised; NaN where it cannot be computed (non-finite features), 0 for an empty cluster.

        With Y the n x D block of a cluster's deviations, det(Y'Y/n + s I_D) = s^D det(I + A) for
        A = YY'/(n s) (n x n) or Y'Y/(n s) (D x D), the same determinant (Sylvester): the smaller
        side is used, so a cluster of thousands of members (a collapsed class) costs a D x D
        matrix, not an n x n one. Padded members (zero rows) change neither.

        I + A is symmetric positive definite, so a Cholesky factor gives the determinant, in
        float64. Not LU (`slogdet`): PyTorch's batched CPU LU runs LAPACK getrf on several
        threads at once, and from 151 x 151 up MKL's pivoting then breaks (pytorch/pytorch#142815):
        "Intel oneMKL ERROR: Parameter 6 was incorrect on entry to SLASWP" on stdout, a hang or
        garbage. Any process with more than one torch thread and a cluster of over 150
        members hit it (the Python API keeps torch's one thread per core; the CLIs pin 1).
        """
        s = sigma**2
        groups = group_by_class(dev.double(), assign, min_count=1)
        y = groups.x / (groups.counts.double().view(-1, 1, 1) * s).sqrt()
        a = y @ y.transpose(1, 2) if y.shape[1] <= y.shape[2] else y.transpose(1, 2) @ y
        factor, info = torch.linalg.cholesky_ex(torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) + a)
        logdet = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1) + dev.shape[1] * math.log(s)
        out = torch.zeros(k, dtype=dev.dtype, device=dev.device)
        return out.index_put_((groups.classes,), torch.where(info == 0, logdet, math.nan).to(dev.dtype))

    def _loss(self, groups: ClassGroups, sigma: float) -> tuple[torch.Tensor, torch.Tensor, Diagnostics]:
        own: Diagnostics = {"fitted": int(self.refits) > 0, "shutoff": False,
                            "logdet_per_dim": float(self.logdet_per_dim)}
        w = self.weights[groups.classes]  # [C, K]
        valid = w.sum(-1) > 0  # classes the last refit saw
        if not own["fitted"] or not bool(valid.any()):
            return graph_zero(groups.x), groups.x.new_zeros(()), {**own, "active": False, "shutoff": True}
        x, mask, counts = groups.x[valid], groups.mask[valid], groups.counts[valid]
        mu, w, s2 = self.centroids[groups.classes[valid]], w[valid], self.spread[groups.classes[valid]]
        with torch.no_grad():  # nearest centroid of the sample's own class (empty clusters excluded)
            assign = torch.cdist(x, mu).masked_fill(w.unsqueeze(1) == 0, float("inf")).argmin(-1)  # [C, M]
            hits = F.one_hot(assign, self.clusters).to(x.dtype) * mask.unsqueeze(-1)  # [C, M, K]
            n = hits.sum(1)  # [C, K]
            alpha = (10 * n / (w * self.nbar).clamp_min(1e-12)).clamp(max=0.99)
        err = (x - mu.gather(1, assign.unsqueeze(-1).expand_as(x))).square().mean(-1)  # [C, M]
        v_hat = (hits * err.unsqueeze(-1)).sum(1) / n.clamp_min(1)
        v = alpha * v_hat + (1 - alpha) * s2
        term = torch.where(n > 0, w * hard_threshold(v, self.var_threshold * sigma**2, self.gamma), 0.0)
        rob = term.sum(-1).mean()
        with torch.no_grad():
            shares = counts.to(x.dtype) / groups.batch_size
            intra = (shares * (err * mask).sum(-1) / counts).sum()
        return rob, intra, {**own, "clusters_hit": int((n > 0).sum()), "alpha_mean": float(alpha[n > 0].mean())}
