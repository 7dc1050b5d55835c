"""The inverse network g: z -> x, shaped by the cut rather than by an architecture.

Two roles train it: the attacker (`attacks.inversion`) and the edge, whose attacker-aware
training pits its encoder against a simulated one (`edge_client.adversarial`); no role imports
another, so it lives here.

One decoder serves every cut of every zoo model: residual blocks first (they undo the
encoder's nonlinear mixing at the feature resolution, where it is cheap), then one
stride-2 transposed convolution per factor of two the encoder downsampled by. When the
factor is not a power of two (28 px pooled three times is 3 px) the nearest number of
doublings is used and a final bilinear resize lands on the exact image size, so no cut
needs its own decoder. A sigmoid keeps outputs in [0, 1], the range images are scored in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(width, width), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def upsampling_stages(feature_hw: tuple[int, int], image_hw: tuple[int, int]) -> int:
    """How many x2 stages bring the feature map closest to the image size (0 for an unpooled cut)."""
    factor = max(image_hw[0] / feature_hw[0], image_hw[1] / feature_hw[1])
    return max(0, round(math.log2(factor)))


class InversionDecoder(nn.Module):
    """Maps features of shape `feature_shape` (C, h, w) to images of `image_shape` (C, H, W) in [0, 1].

    `loss_history` holds the per-epoch training loss once the attacker's `train_inversion` has
    fitted it, so a run can record how long, and how well, the network it used was trained.
    """

    def __init__(self, feature_shape: tuple[int, int, int], image_shape: tuple[int, int, int], width: int = 64,
                 blocks: int = 2) -> None:
        super().__init__()
        self.loss_history: list[float] = []
        self.image_hw = (int(image_shape[1]), int(image_shape[2]))
        layers: list[nn.Module] = [*_conv_bn_relu(feature_shape[0], width)]
        layers += [_ResBlock(width) for _ in range(blocks)]
        for _ in range(upsampling_stages((feature_shape[1], feature_shape[2]), self.image_hw)):
            layers += [nn.ConvTranspose2d(width, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, image_shape[0], 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.body(z)
        if tuple(h.shape[-2:]) != self.image_hw:
            h = F.interpolate(h, size=self.image_hw, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(h))
