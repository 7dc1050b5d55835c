"""Where the edge trainer meets `cem/`: when CEM is active and how its gradient is merged.

CEM is active when lambda > 0, sigma > 0 and the epoch is past the surrogate's warm-up
(CEM_SPEC section 4). Without it, a step is a plain backward of the task loss. With it,
the two-phase merge adds lambda * w_lr * grad(rob_loss) to the encoder's gradients.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader, Dataset

import cem
from cem.merge import lr_weight, two_phase_backward
from edge_client.config import EdgeConfig

log = logging.getLogger(__name__)

_GATE_KEYS = ("soft_gate_mean", "snr_gate_mean", "class_gate_mean")


class CemHook:
    def __init__(self, config: EdgeConfig, edge, module: torch.nn.Module | None) -> None:
        d = config.defense
        self.config, self.edge, self.module = config, edge, module
        defaults = cem.DEFAULTS.get(d.cem, {"scale": 1.0, "warmup": 0})
        self.scale = d.cem_scale if d.cem_scale is not None else defaults["scale"]
        self.warmup = d.cem_warmup if d.cem_warmup is not None else defaults["warmup"]
        self.sigma, self.lam = d.noise, d.lam
        self._joined = False
        self._epoch: list[tuple[float, float, dict]] = []
        self._last_epoch: dict = {}
        self.shutoff_steps = 0
        if module is not None and self.sigma <= 0:
            log.warning("--cem %s with --noise 0: CEM needs obfuscation noise to work with and stays off", d.cem)

    @classmethod
    def create(cls, config: EdgeConfig, edge) -> "CemHook":
        d = config.defense
        if d.cem == "none":
            return cls(config, edge, None)
        dim = math.prod(edge.split.feature_shape)
        module = cem.build(d.cem, dim, num_classes=edge.split.spec.num_classes, var_threshold=d.var_threshold,
                           learn_gates=d.learn_gates, bounded=edge.split.spec.bottleneck > 0)
        edge.surrogate = module.to(config.device)
        return cls(config, edge, module)

    def active(self, epoch: int) -> bool:
        return self.module is not None and self.lam > 0 and self.sigma > 0 and epoch > self.warmup

    def backward(self, task: torch.Tensor, z: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        """Backward the task loss, merged with CEM's gradient when CEM is active."""
        if not self.active(epoch):
            task.backward()
            return
        self._join_optimizer()
        rob, intra, diag = self.module(z, y, self.sigma)
        self._epoch.append((float(rob.detach()), float(intra), diag))
        self.shutoff_steps += int(bool(diag.get("shutoff", False)))
        two_phase_backward(self.scale * rob, task.backward, list(self.edge.split.encoder.parameters()),
                           list(self.module.parameters()), self.lam * lr_weight(self._lr()))

    def _lr(self) -> float:
        return self.edge.optimizer.param_groups[0]["lr"]

    def _join_optimizer(self) -> None:
        """The surrogate's parameters join the optimizer the first time it runs (CEM_SPEC section 4)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not self._joined and params:
            self.edge.optimizer.add_param_group({"params": params})
        self._joined = True

    def end_epoch(self, epoch: int, train_set: Dataset) -> dict:
        """Epoch-end work (GMM refit) and the epoch's CEM diagnostics for the history."""
        if self.module is None:
            return {}
        if hasattr(self.module, "refit") and self.sigma > 0 and self.lam > 0:
            feats, labels = self._encode_all(train_set)
            self.module.refit(feats, labels, self.sigma)
        record = {"cem_active": self.active(epoch)}
        if self._epoch:
            record["rob_loss_mean"] = sum(r for r, _, _ in self._epoch) / len(self._epoch)
            record["batch_intra_mse"] = sum(i for _, i, _ in self._epoch) / len(self._epoch)
            for key in _GATE_KEYS:
                vals = [d[key] for _, _, d in self._epoch if key in d]
                if vals:
                    record[key] = sum(vals) / len(vals)
        self._epoch = []
        self._last_epoch = record
        return record

    @torch.no_grad()
    def _encode_all(self, train_set: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.edge.split.encoder
        encoder.eval()
        feats, labels = [], []
        for x, y in DataLoader(train_set, batch_size=256):
            feats.append(encoder(x.to(self.config.device)))
            labels.append(y)
        encoder.train()
        return torch.cat(feats), torch.cat(labels)

    def summary(self, record: dict) -> str:
        if "rob_loss_mean" not in record:
            return ""
        gates = " ".join(f"{k.removesuffix('_mean')} {record[k]:.3f}" for k in _GATE_KEYS if k in record)
        return f"; cem rob {record['rob_loss_mean']:.4g} intra_mse {record['batch_intra_mse']:.4g} {gates}"

    def report(self, train_set: Dataset) -> dict:
        """Last-epoch CEM figures, and the final class-conditional spread of the clean features.

        `intra_mse` is measured for every run, CEM or not, on the whole training set in
        eval mode: sum_c p_c * mean ||z - mu_c||^2 / D, so runs with and without CEM compare.
        """
        feats, labels = self._encode_all(train_set)
        out: dict = {"intra_mse": class_spread(feats.flatten(1), labels)}
        if self.module is not None:
            out.update({k: v for k, v in self._last_epoch.items() if k != "cem_active"})
            out["early_shutoff_steps"] = self.shutoff_steps
            out["cem_nan_count"] = int(getattr(self.module, "nan_count", 0))
        return out


def class_spread(z: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    for c in y.unique():
        zc = z[y == c]
        total += len(zc) / len(z) * float(((zc - zc.mean(0)) ** 2).mean())
    return total
