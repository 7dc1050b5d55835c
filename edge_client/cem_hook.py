"""Where the edge trainer meets `cem/`: when CEM runs and how its gradient is merged.

CEM is active when lambda > 0, sigma > 0 and the epoch is past the surrogate's warm-up
(docs/CEM.md §4.1). Otherwise a step is a plain backward of the task loss; with it, the
two-phase merge adds lambda * w_lr * grad(rob_loss) to the encoder's gradients.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader, Dataset

import cem
from edge_client.config import EdgeConfig
from splitnet.models import SplitModel

log = logging.getLogger(__name__)

_GATE_KEYS = ("soft_gate_mean", "snr_gate_mean", "class_gate_mean", "attn_max_mean", "slot_weight_max")
WEAK_PULL = 0.01  # below this share of the task gradient, for a whole epoch, CEM changes nothing measurable
# The slot surrogate sits out its first calls while its attention is still random. The seeds
# fixed that at 100 calls, a quarter of a CIFAR-10 epoch at batch 128; on a small set 100
# calls are several epochs (digits: 23 steps an epoch, so 4 of an 8-epoch run). Measured in
# epochs, the shut-off means the same thing on every dataset and batch size.
SLOT_SHUTOFF_EPOCHS = 0.25


class CemHook:
    def __init__(self, config: EdgeConfig, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 module: cem.Surrogate | None) -> None:
        self.config, self.defense = config, config.defense
        self.encoder, self.optimizer, self.module = encoder, optimizer, module
        self._steps: list[tuple[float, float, dict]] = []
        self._last_epoch: dict = {}
        self.shutoff_steps = 0
        self._joined = False
        if module is not None and self.defense.noise <= 0:
            log.warning("--cem %s with --noise 0: CEM needs obfuscation noise to work with and stays off",
                        self.defense.cem)

    @classmethod
    def create(cls, config: EdgeConfig, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
               split: SplitModel, steps_per_epoch: int) -> "CemHook":
        d = config.defense
        module = None
        if d.cem != "none":
            own: dict = {} if d.gates is None else {"gates": d.gates}
            if d.cem == "slot":
                own["early_shut_steps"] = math.ceil(SLOT_SHUTOFF_EPOCHS * steps_per_epoch)
            module = cem.build(d.cem, math.prod(split.feature_shape), num_classes=split.spec.num_classes,
                               var_threshold=d.var_threshold, learn_gates=d.learn_gates,
                               bounded=split.spec.bottleneck > 0, **own).to(config.device)
        return cls(config, encoder, optimizer, module)

    def backward(self, task: torch.Tensor, z: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        """Backward the task loss, merged with CEM's gradient when CEM is active."""
        if self.module is None or not self.defense.cem_active(epoch):
            task.backward()
            return
        if not self._joined:  # the surrogate's parameters train from the first CEM step on (docs/CEM.md §4.2)
            cem.join_optimizer(self.optimizer, self.module)
            self._joined = True
        rob, intra, diag = self.module(z, y, self.defense.noise)
        self._steps.append((float(rob.detach()), float(intra), diag))
        self.shutoff_steps += int(bool(diag.get("shutoff", False)))
        lr = self.optimizer.param_groups[0]["lr"]
        weight = self.defense.lam * cem.lr_weight(lr)
        norms = cem.two_phase_backward(self.defense.scale * rob, task.backward, self.encoder.parameters(),
                                       self.module.parameters(), weight, features=z)
        # the pull: how hard CEM steers the encoder against the task, both taken at z
        diag["pull"] = weight * float(norms["rob_grad_norm"]) / max(float(norms["task_grad_norm"]), 1e-12)
        diag["w_lr"] = cem.lr_weight(lr)

    def state(self) -> dict:
        """What a resumed run needs to go on as this one would (edge_client.state): the surrogate's
        weights and buffers (GMM fit, gates), whether its parameters joined the optimizer, and the
        open epoch's per-step figures and counters."""
        return {"module": self.module.state_dict() if self.module is not None else None,
                "nan_count": int(getattr(self.module, "nan_count", 0)), "joined": self._joined,
                "steps": list(self._steps), "last_epoch": dict(self._last_epoch), "shutoff_steps": self.shutoff_steps}

    def load_state(self, state: dict) -> None:
        """Adopt `state`; before the optimizer's state is loaded, whose parameter groups include the
        surrogate's once it joined."""
        if self.module is not None:
            self.module.load_state_dict(state["module"])
            self.module.nan_count = state["nan_count"]
        if state["joined"] and not self._joined:
            cem.join_optimizer(self.optimizer, self.module)
            self._joined = True
        self._steps, self._last_epoch = list(state["steps"]), dict(state["last_epoch"])
        self.shutoff_steps = state["shutoff_steps"]

    def end_epoch(self, epoch: int, train_set: Dataset) -> dict:
        """Epoch-end work (the GMM refit) and the epoch's CEM diagnostics for the history."""
        if self.module is None:
            return {}
        if hasattr(self.module, "refit") and self.defense.noise > 0 and self.defense.lam > 0:
            self.module.refit(*self._encode_all(train_set), self.defense.noise)
        record: dict = {"cem_active": self.defense.cem_active(epoch)}
        if self._steps:
            record["rob_loss_mean"] = sum(r for r, _, _ in self._steps) / len(self._steps)
            record["batch_intra_mse"] = sum(i for _, i, _ in self._steps) / len(self._steps)
            for key in _GATE_KEYS:
                values = [d[key] for _, _, d in self._steps if key in d]
                if values:
                    record[key] = sum(values) / len(values)
            record["cem_pull"] = sum(d["pull"] for _, _, d in self._steps) / len(self._steps)
            record["cem_w_lr"] = self._steps[-1][2]["w_lr"]
            if record["cem_pull"] < WEAK_PULL:
                log.warning("epoch %d: CEM is not acting: its pull on the encoder, lambda * w_lr * |g_rob| / "
                            "|g_task|, averaged %.2g%% (below %g%%); raise --lambda or reach the low-lr phase "
                            "of the schedule where w_lr = 1", epoch, 100 * record["cem_pull"], 100 * WEAK_PULL)
        self._steps = []
        self._last_epoch = record
        return record

    @torch.no_grad()
    def _encode_all(self, train_set: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.encoder.training
        self.encoder.eval()
        feats, labels = [], []
        for x, y in DataLoader(train_set, batch_size=256):
            feats.append(self.encoder(x.to(self.config.device)))
            labels.append(y)
        self.encoder.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def summary(self, record: dict) -> str:
        if "rob_loss_mean" not in record:
            return ""
        gates = " ".join(f"{k.removesuffix('_mean')} {record[k]:.3f}" for k in _GATE_KEYS if k in record)
        return (f"; cem rob {record['rob_loss_mean']:.4g} intra_mse {record['batch_intra_mse']:.4g} "
                f"pull {100 * record['cem_pull']:.2g}% w_lr {record['cem_w_lr']:.3g} {gates}")

    def report(self, train_set: Dataset) -> dict:
        """Last-epoch CEM figures, and the final class-conditional spread of the clean features.

        `intra_mse` is measured for every run, CEM or not, on the whole training set in
        eval mode: sum_c p_c * mean((z - mu_c)^2), so runs with and without CEM compare.
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
