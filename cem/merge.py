"""The two-phase gradient merge of docs/CEM.md §4.3 and the helpers around it.

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
                       weight: float, features: torch.Tensor | None = None) -> dict[str, float | str]:
    """docs/CEM.md §4.3 steps 1-4; the caller then steps the optimizer.

    rob_loss: already scaled by attention_loss_scale. task_backward: backpropagates the
    task loss into the encoder (e.g. `z_sent.backward(grad_from_cloud)`) and must not
    zero gradients itself. weight: lambda * w_lr. Afterwards the encoder grads hold
    g_task + weight * g_rob and the surrogate grads g_sur (+ any task gradient they got).
    Both parameter sets' grads are cleared (set to None) before task_backward (step 2).

    features: the encoder output z that rob_loss was computed from. Given it, the result
    is the same (up to float rounding) at half the encoder cost: by linearity of the
    backward pass, J^T g_task_z + weight * J^T g_rob_z = J^T (g_task_z + weight * g_rob_z),
    so the rob gradient is taken only down to z, and a hook adds weight * g_rob_z to the
    gradient that task_backward sends through z: one encoder backward instead of two.
    Without it, g_rob is taken on the encoder parameters (the literal §4.3 recipe).

    Returns the rob and task gradient norms (before weighting) for logging, taken at
    "features" or at the "encoder" params: their ratio shows which term steers the encoder.
    """
    encoder = [p for p in encoder_params if p.requires_grad]
    surrogate = [p for p in surrogate_params if p.requires_grad]
    via_features = features is not None and features.requires_grad
    targets = ([features] if via_features else encoder) + surrogate
    if rob_loss.requires_grad and targets:
        rob_grads = torch.autograd.grad(rob_loss, targets, retain_graph=True, allow_unused=True)
    else:
        rob_grads = (None,) * len(targets)
    split = len(targets) - len(surrogate)
    g_rob, g_sur = rob_grads[:split], rob_grads[split:]
    if via_features and rob_loss.requires_grad and g_rob[0] is None:  # else the rob term would vanish silently
        raise ValueError("rob_loss does not depend on `features`: pass the tensor the surrogate was given")
    for p in encoder + surrogate:
        p.grad = None
    stats: dict[str, float | str] = {"at": "features" if via_features else "encoder", "rob_grad_norm": _norm(g_rob)}
    if via_features:
        stats["task_grad_norm"] = _backward_with_added_grad(task_backward, features, g_rob[0], weight)
    else:
        task_backward()
        stats["task_grad_norm"] = _norm(p.grad for p in encoder)
        _accumulate(encoder, [g * weight if g is not None else None for g in g_rob])
    _accumulate(surrogate, g_sur)
    return stats


def _backward_with_added_grad(task_backward: Callable[[], None], z: torch.Tensor,
                              g_rob: torch.Tensor | None, weight: float) -> float:
    """Run task_backward with weight * g_rob added, once, to the gradient reaching z.

    Returns the norm of the task gradient at z. If task_backward never reached z, the
    rob gradient is pushed through the encoder on its own, so it is never lost.
    """
    seen: list[torch.Tensor] = []

    def add_rob(grad: torch.Tensor) -> torch.Tensor:
        seen.append(grad.detach())
        if g_rob is None or len(seen) > 1:  # several task backward passes: add it to the first only
            return grad
        return grad + weight * g_rob

    handle = z.register_hook(add_rob)
    try:
        task_backward()
    finally:
        handle.remove()
    if not seen and g_rob is not None:
        z.backward(weight * g_rob, retain_graph=True)
    return _norm(seen)


def _accumulate(params: list[nn.Parameter], grads: Iterable[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)


def _norm(grads: Iterable[torch.Tensor | None]) -> float:
    present = [g.detach() for g in grads if g is not None]
    return float(nn.utils.get_total_norm(present)) if present else 0.0
