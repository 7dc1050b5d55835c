"""The two-phase gradient merge of CEM_SPEC §4 and the helpers around it.

Why two phases rather than `task + lambda * rob` in one backward: the encoder's share of
the robustness gradient gets its own weight lambda * w_lr (tied to the learning rate),
while the surrogate's own parameters take their rob gradient unweighted. One backward
of a summed loss cannot give the two parameter sets different weights.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

LR_POLICIES = ("original", "constant")


def lr_weight(lr: float, policy: str = "original") -> float:
    """w_lr: "original" is the CEM code's 0.001 / lr while lr >= 4.1e-4, then 1
    (it keeps lr * w_lr constant, so the rob step size does not shrink with a decaying
    lr until late in training); "constant" is 1."""
    if policy == "original":
        return 0.001 / lr if lr >= 4.1e-4 else 1.0
    if policy == "constant":
        return 1.0
    raise ValueError(f"unknown lr policy {policy!r}; choose one of {LR_POLICIES}")


def is_active(lam: float, sigma: float, epoch: int, warmup: int) -> bool:
    """CEM runs when lambda > 0, sigma > 0 and epoch > warmup (epochs counted from 1)."""
    return lam > 0 and sigma > 0 and epoch > warmup


def join_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module, **group_options: float) -> bool:
    """Add the module's trainable parameters as a new param group, once; True if it did."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in held]
    if not params:
        return False
    optimizer.add_param_group({"params": params, **group_options})
    return True


def two_phase_backward(rob_loss: torch.Tensor, task_backward: Callable[[], None],
                       encoder_params: Iterable[nn.Parameter], surrogate_params: Iterable[nn.Parameter],
                       weight: float) -> dict[str, float]:
    """CEM_SPEC §4 steps 1-4; the caller then steps the optimizer.

    rob_loss: already scaled by attention_loss_scale. task_backward: backpropagates the
    task loss into the encoder (e.g. `z.backward(grad_from_cloud)`), and must not zero
    gradients itself. weight: lambda * w_lr. Afterwards encoder grads hold
    g_task + weight * g_rob and surrogate grads g_task + g_rob (g_task usually None there).
    The rob gradients are taken with autograd.grad, which leaves every .grad untouched and
    keeps the shared encoder graph alive for task_backward. Both parameter sets' grads are
    cleared (set to None) before task_backward, as step 2 prescribes.
    Returns the gradient norms, for logging.
    """
    encoder = [p for p in encoder_params if p.requires_grad]
    surrogate = [p for p in surrogate_params if p.requires_grad]
    params = encoder + surrogate
    if rob_loss.requires_grad and params:
        rob_grads = torch.autograd.grad(rob_loss, params, retain_graph=True, allow_unused=True)
    else:
        rob_grads = (None,) * len(params)
    for p in params:
        p.grad = None
    task_backward()
    task_norm = _norm(p.grad for p in encoder)
    for i, (p, g) in enumerate(zip(params, rob_grads)):
        if g is None:
            continue
        g = g * weight if i < len(encoder) else g
        p.grad = g if p.grad is None else p.grad.add_(g)
    return {"rob_grad_norm": _norm(rob_grads[:len(encoder)]), "task_grad_norm": task_norm,
            "surrogate_grad_norm": _norm(rob_grads[len(encoder):])}


def _norm(grads: Iterable[torch.Tensor | None]) -> float:
    squares = [g.detach().square().sum() for g in grads if g is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0
