"""Training-based inversion (He et al. 2019, black-box inverse network).

The attacker owns (or can query) the encoder and has auxiliary images from the private
data's distribution, so it can make its own (z, x) pairs and fit g: z -> x by pixel
MSE. By default it is noise-aware: the edge's defense is applied to its training
features too, which is the strongest attacker against an obfuscation defense (a
decoder fitted on clean features and shown noisy ones understates the leak).
The encoder runs in eval mode without gradients, so nothing about it changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from attacks._common import Obfuscate, device_of, evaluating, fit, seeded, shuffled
from splitnet.inverse_models import InversionDecoder


def train_inversion(encoder: nn.Module, aux_images: Tensor | Dataset, feature_shape: tuple[int, int, int],
                    image_shape: tuple[int, int, int], obfuscate: Obfuscate | None = None, epochs: int = 50,
                    lr: float = 1e-3, batch_size: int = 64, seed: int = 0, progress: bool = True,
                    width: int = 64, blocks: int = 2) -> InversionDecoder:
    """Fit an inverse network on `aux_images` (labels, if any, are ignored); returned in eval mode,
    with its per-epoch training loss in `loss_history`."""
    device = device_of(encoder)
    with seeded(seed), evaluating(encoder):
        decoder = InversionDecoder(feature_shape, image_shape, width, blocks).to(device)

        def batch_loss(batch: list[Tensor]) -> Tensor:
            x = batch[0].to(device)
            with torch.no_grad():
                z = encoder(x)
                if obfuscate is not None:
                    z = obfuscate(z)
            return F.mse_loss(decoder(z), x)

        decoder.loss_history = fit(decoder.parameters(), batch_loss, shuffled(aux_images, batch_size, seed), epochs,
                                   lr, progress, "inversion")
    return decoder.eval()


@torch.no_grad()
def reconstruct(decoder: nn.Module, features: Tensor, batch_size: int = 256) -> Tensor:
    """Apply a trained inverse network to intercepted features, in eval mode, batch by batch."""
    device = device_of(decoder)
    with evaluating(decoder):
        return torch.cat([decoder(z.to(device)).cpu() for z in features.split(batch_size)])
