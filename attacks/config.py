"""What an attack is asked to do: its method, the inverse network's size, rMLE's knobs.

Apart from `attacks.runner` (torch) so that `attacker` can build its parser, and show
these defaults, without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

RMLE_LR = 1e-2  # rMLE's Adam learning rate (attacks.rmle)
TV_WEIGHT = 0.05  # rMLE's total-variation weight lambda_TV (attacks.rmle)
METHODS = ("inversion", "rmle", "shadow")
MINIMUM = {"epochs": 1, "width": 1, "blocks": 0, "shadow_epochs": 1, "rmle_iterations": 0}  # checked in AttackConfig


@dataclass(frozen=True)
class InverseNet:
    """The inverse network's size and training length (inversion, and shadow's second stage)."""

    blocks: int  # residual blocks at the feature resolution
    width: int  # channels
    epochs: int


# RGB: as strong as the CEM paper's attacker (after He et al. 2019): a deep residual decoder,
# 8 blocks of 64 channels, 50 epochs, trained on obfuscated features (`noise_aware`).
# Natural 32 px colour images need that depth; anything lighter understates the leak and so
# flatters a defense. Other inputs (digits, MNIST: one channel of strokes) keep the lighter 2 blocks
# this project always used on them (four times fewer residual convolutions), so their sweeps stay cheap.
RGB_INVERSE = InverseNet(blocks=8, width=64, epochs=50)
LIGHT_INVERSE = InverseNet(blocks=2, width=64, epochs=50)


def default_inverse(image_shape: tuple[int, ...]) -> InverseNet:
    """The default inverse network for images of `image_shape` (C, H, W): the one place it is decided."""
    return RGB_INVERSE if image_shape[0] == 3 else LIGHT_INVERSE


@dataclass(frozen=True)
class AttackConfig:
    method: str = "inversion"
    epochs: int | None = None  # inverse-network epochs (inversion, shadow); None: default_inverse's
    shadow_epochs: int = 30
    rmle_iterations: int = 500
    noise_aware: bool = True  # apply the edge's obfuscation to the attacker's own training features
    seed: int = 0
    progress: bool = True
    width: int | None = None  # channels of the inverse network; None: default_inverse's
    blocks: int | None = None  # residual blocks of the inverse network; None: default_inverse's
    rmle_lr: float = RMLE_LR
    rmle_tv_weight: float = TV_WEIGHT

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name, low in MINIMUM.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")

    def resolved(self, image_shape: tuple[int, ...]) -> "AttackConfig":
        """This config with every unset inverse-network setting taken from `default_inverse(image_shape)`."""
        net = default_inverse(image_shape)
        return replace(self, **{k: getattr(net, k) for k in ("blocks", "width", "epochs") if getattr(self, k) is None})
