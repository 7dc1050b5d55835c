"""The obfuscation between the encoder and the wire: a contract of the edge and the attacker.

The edge applies it to every feature batch it sends; the noise-aware attacker applies
the same chain, with the settings the edge saved next to its encoder, to its own
training features, so that its inverse network learns on what the wire carries. Both
must draw from one implementation, hence it lives here rather than in either role.

Order: noise, then a dropout mask, then top-k pruning, identical in training and
inference (an attacker sees the same kind of features either way); last, where the edge
learned which channels to keep (`edge-client --prune-ratio`), every other channel is
zeroed, and is not sent (`splitnet.codec`). The channels it kept are a result of its
training, not a setting: the edge writes them into the defense record of its encoder
file under KEPT_CHANNELS, and `Obfuscation.from_settings` replays them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from splitnet.settings import ObfuscationConfig

KEPT_CHANNELS = "kept_channels"  # the defense record's key of the channels a pruning edge sends


class Obfuscation(nn.Module):
    """noise -> dropout mask (no rescale) -> top-k pruning -> kept channels; the same in train
    and eval mode.

    Random draws come from `generator` when given (on its own device, then moved), so a
    run can be replayed exactly; otherwise from torch's global RNG. `channels`: the
    channels (dimension 1) that pass, the others are zeroed; None: all pass.
    """

    def __init__(self, config: ObfuscationConfig, generator: torch.Generator | None = None,
                 channels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config, self.generator = config, generator
        self.channels = None if channels is None else list(channels)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], generator: torch.Generator | None = None) -> "Obfuscation":
        """The chain a defense record describes (an encoder file's `defense`), kept channels included."""
        return cls(ObfuscationConfig.from_settings(settings), generator, settings.get(KEPT_CHANNELS))

    def _rand(self, like: torch.Tensor, normal: bool = False) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else like.device
        draw = torch.randn if normal else torch.rand
        return draw(like.shape, generator=self.generator, device=device, dtype=like.dtype).to(like.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.noise > 0:
            if cfg.noise_kind == "gaussian":
                eps = self._rand(z, normal=True)
            else:  # Laplace(0, 1) as the difference of two Exp(1) draws; 1 - U in (0, 1] keeps log finite
                eps = torch.log1p(-self._rand(z)) - torch.log1p(-self._rand(z))
            z = z + cfg.noise * eps
        if cfg.dropout > 0:
            z = z * (self._rand(z) >= cfg.dropout).to(z.dtype)
        if cfg.topk > 0:
            z = topk_prune(z, cfg.topk)
        if self.channels is not None:
            z = keep_channels(z, self.channels)
        return z


def keep_channels(z: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """Zero every channel (dimension 1) but `channels`, through a mask, so the kept ones pass their
    gradient unchanged."""
    mask = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    mask[list(channels)] = 1
    return z * mask.view(1, -1, *([1] * (z.dim() - 2)))


def topk_prune(z: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the floor(ratio * n) smallest-magnitude features of each sample (n per sample).

    Done through a mask, so the kept features pass their gradient unchanged.
    """
    flat = z.flatten(1)
    drop = int(ratio * flat.shape[1])
    if drop == 0:
        return z
    idx = flat.abs().topk(drop, dim=1, largest=False).indices
    mask = torch.ones_like(flat).scatter_(1, idx, 0.0)
    return (flat * mask).view_as(z)
