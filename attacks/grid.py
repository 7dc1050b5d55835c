"""Side-by-side picture of an attack: rows alternate, private images above their reconstructions.

Pairing rows (truth row, reconstruction row, next truth row, ...) keeps every
reconstruction directly under its original, which is how a reader judges a leak; a
padded last chunk keeps that alignment when N is not a multiple of `nrow`. Each row is
labelled in a left margin, so a reader of a report that embeds the picture does not have
to know the convention (docs/ATTACKS_AND_METRICS.md §4.5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.nn import functional as F

from splitnet import compat  # noqa: F401  (must precede torchvision)
from torchvision.utils import make_grid

LABELS = ("private", "recon")  # row 0, 2, 4, ...: private images; rows 1, 3, 5, ...: reconstructions
PADDING = 2


def save_grid(truth: Tensor, recon: Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> None:
    """Write a PNG of `truth` and `recon` ([N, C, H, W] in [0, 1]); `scale` enlarges tiny images (nearest)."""
    if truth.shape != recon.shape:
        raise ValueError(f"truth {tuple(truth.shape)} and recon {tuple(recon.shape)} differ in shape")
    pad = -len(truth) % nrow
    chunks = [F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)).unflatten(0, (-1, nrow)) for t in (truth, recon)]
    rows = torch.stack(chunks, dim=1).flatten(0, 2).detach().cpu().float().clamp(0, 1)  # truth row, recon row, ...
    if scale > 1:
        rows = F.interpolate(rows, scale_factor=scale, mode="nearest")
    grid = make_grid(rows, nrow=nrow, padding=PADDING, pad_value=1.0)
    pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    font = ImageFont.load_default()
    margin = max(int(font.getlength(label)) for label in LABELS) + 2 * PADDING
    canvas = Image.new("RGB", (margin + pixels.shape[1], pixels.shape[0]), "white")
    canvas.paste(Image.fromarray(pixels), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = rows.shape[-2] + PADDING
    for i in range(len(rows) // nrow):
        draw.text((PADDING, PADDING + i * row_height + rows.shape[-2] // 2), LABELS[i % 2], fill="black",
                  font=font, anchor="lm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(str(path))
