"""Reconstruction quality, scored the one way every report in this project uses.

Conventions: images in [0, 1] and clamped, each metric per
image and then averaged over images. Pooling MSE over a batch before taking PSNR lets
one bad image dominate, and a batch-derived SSIM data range makes scores depend on what
else is in the batch, so neither is done here.

Computation runs in float64: SSIM subtracts close numbers (E[x^2] - E[x]^2) and float32
leaves errors of ~1e-4 that would blur the comparison against scikit-image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splitnet import compat  # noqa: F401  (must precede torchmetrics)
from torchmetrics.functional.image import structural_similarity_index_measure

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # torchmetrics and scikit-image both derive 11 from sigma 1.5 (truncate 3.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_BORDER = (SSIM_WINDOW - 1) // 2
PSNR_CAP_DB = 100.0  # PSNR of an exact reconstruction; finite so that means stay finite

SSIM_CONVENTION = (
    f"SSIM: torchmetrics, Gaussian window {SSIM_WINDOW}x{SSIM_WINDOW} sigma {SSIM_SIGMA}, "
    f"K1 {SSIM_K1}, K2 {SSIM_K2}, data range 1.0 on images clamped to [0,1]; images reflect-padded by "
    f"{SSIM_BORDER} px so the map covers every pixel (also images smaller than the window, e.g. 8x8; "
    f"sides must exceed {SSIM_BORDER} px); per-image mean of the map, then mean over images. "
    f"scikit-image instead drops a {SSIM_BORDER}-px border: same map inside, different average. "
    f"PSNR: per image, peak 1.0, capped at {PSNR_CAP_DB:g} dB, then mean. MSE: per image, then mean."
)


def _prepare(recon: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    if recon.shape != truth.shape or recon.ndim != 4:
        raise ValueError(f"expected two [N, C, H, W] batches of one shape, got {tuple(recon.shape)} "
                         f"and {tuple(truth.shape)}")
    if min(recon.shape[-2:]) <= SSIM_BORDER:
        raise ValueError(f"images of {tuple(recon.shape[-2:])} px are too small for the SSIM reflect padding "
                         f"({SSIM_BORDER} px): sides must be at least {SSIM_BORDER + 1}")
    return (recon.detach().to("cpu", torch.float64).clamp(0, 1),
            truth.detach().to("cpu", torch.float64).clamp(0, 1))


def ssim_map(recon: Tensor, truth: Tensor) -> Tensor:
    """The local SSIM at every pixel, [N, C, H, W]; its border is where implementations differ."""
    recon, truth = _prepare(recon, truth)
    _, full = structural_similarity_index_measure(
        recon, truth, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW, reduction="none",
        data_range=(0.0, 1.0), k1=SSIM_K1, k2=SSIM_K2, return_full_image=True)
    return full


def per_image(recon: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Per-image MSE, PSNR (dB) and SSIM, each a float64 tensor of shape [N]."""
    recon_c, truth_c = _prepare(recon, truth)
    mse = (recon_c - truth_c).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1.0 / mse)).clamp(max=PSNR_CAP_DB)  # mse 0 gives inf, capped
    ssim = ssim_map(recon_c, truth_c).flatten(1).mean(1)
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def score(recon: Tensor, truth: Tensor) -> dict[str, float]:
    """Mean over images of the per-image metrics: {"mse", "ssim", "psnr"}."""
    return {name: float(values.mean()) for name, values in per_image(recon, truth).items()}
