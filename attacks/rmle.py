"""White-box regularised maximum-likelihood estimation (rMLE, He et al. 2019).

With the encoder's weights an attacker needs no training data: it searches for the image
whose features match the intercepted ones, argmin_x ||F_e(x) - z||^2 + lambda_TV TV(x).
The total-variation prior picks, among images with near-equal features (pooling and
ReLU discard information), the piecewise-smooth one natural images resemble.

Choices the paper leaves open: the feature term is the mean over feature elements per
image, summed over images, so each image's optimisation is independent of the batch
and of the cut's feature size (a sum over elements differs by a constant factor per cut,
which only rescales lambda_TV); TV is anisotropic (mean absolute neighbour difference, a
mean per pixel so lambda_TV does not depend on the image size); x stays in [0, 1] by
projection (clamp after each Adam step), which, unlike a sigmoid parameterisation, lets
pixels reach exactly 0 or 1 without vanishing gradients. rMLE matches the intercepted z as
it is, obfuscation included: it has no model of the defense (the noise-aware attacker is
the inversion network). `iterations`, `lr` and `tv_weight` are the attacker's knobs
(`attacker run --rmle-iterations / --rmle-lr / --rmle-tv-weight`, recorded in run.json).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks._common import device_of, evaluating
from attacks.config import RMLE_LR, TV_WEIGHT


def total_variation(x: Tensor) -> Tensor:
    """Per-image anisotropic TV: mean |vertical| + mean |horizontal| neighbour difference, shape [N]."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def rmle(encoder: nn.Module, features: Tensor, image_shape: tuple[int, int, int], iterations: int = 500,
         lr: float = RMLE_LR, tv_weight: float = TV_WEIGHT, batch_size: int = 256) -> Tensor:
    """Reconstruct one image per feature map, starting every pixel at 0.5."""
    device = device_of(encoder)
    with evaluating(encoder):  # eval batch norm: images do not interact, running stats stay put
        return torch.cat([_invert(encoder, z.to(device), image_shape, iterations, lr, tv_weight).cpu()
                          for z in features.split(batch_size)])


def _invert(encoder: nn.Module, z: Tensor, image_shape: tuple[int, int, int], iterations: int, lr: float,
            tv_weight: float) -> Tensor:
    x = torch.full((len(z), *image_shape), 0.5, device=z.device, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(iterations):
        loss = ((encoder(x) - z).pow(2).flatten(1).mean(1) + tv_weight * total_variation(x)).sum()
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach()
