"""Side-by-side picture of an attack: each row of private images above its reconstructions.

Pairing rows (truth row, reconstruction row, next truth row, ...) keeps every
reconstruction directly under its original, which is how a reader judges a leak; a
padded last chunk keeps that alignment when N is not a multiple of `nrow`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from splitnet import compat  # noqa: F401  (must precede torchvision)
from torchvision.utils import save_image


def save_grid(truth: Tensor, recon: Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> None:
    """Write a PNG of `truth` and `recon` ([N, C, H, W] in [0, 1]); `scale` enlarges tiny images (nearest)."""
    if truth.shape != recon.shape:
        raise ValueError(f"truth {tuple(truth.shape)} and recon {tuple(recon.shape)} differ in shape")
    pad = -len(truth) % nrow
    chunks = [F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)).unflatten(0, (-1, nrow)) for t in (truth, recon)]
    rows = torch.stack(chunks, dim=1).flatten(0, 2).detach().cpu().float().clamp(0, 1)  # truth row, recon row, ...
    if scale > 1:
        rows = F.interpolate(rows, scale_factor=scale, mode="nearest")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, str(path), nrow=nrow, padding=2, pad_value=1.0)
