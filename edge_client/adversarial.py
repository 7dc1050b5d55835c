"""Attacker-aware training and learned channel pruning (docs/DEFENSES.md); pure torch.

Both act on what the features reveal rather than on their variance. The edge trains its own
inverse network on the features it sends (`SimulatedAttacker`, after ResSFL, Li et al.,
CVPR 2022) and pushes its encoder up that network's reconstruction error; a learned score
per channel decides which channels are sent at all (`ChannelGate`, after DISCO, Singh et
al., CVPR 2021), trained by the same gradients. The trainer wires them in through
`edge_client.adversary_hook`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from splitnet.inverse_models import InversionDecoder
from splitnet.obfuscation import keep_channels


class SimulatedAttacker:
    """An inverse network trained step by step on (sent features, images), as an attacker who
    intercepts the features and holds images like the private ones would train it.

    Its one forward and backward per step serve twice: its own Adam step, and the gradient of
    its reconstruction MSE at the features, which the encoder's loss takes with weight -A. That
    gradient is taken before the step, at the network that produced the error, so the encoder
    is pushed against the attacker as it stands.
    """

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, ...], width: int, blocks: int,
                 lr: float) -> None:
        self.net = InversionDecoder(tuple(feature_shape), tuple(image_shape), width, blocks)  # type: ignore[arg-type]
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    def to(self, device: str | torch.device) -> "SimulatedAttacker":
        self.net.to(device)
        return self

    def step(self, z_sent: Tensor, x: Tensor) -> tuple[float, Tensor]:
        """Train one step on this batch; return its reconstruction MSE before the step and the
        MSE's gradient with respect to `z_sent` (detached: the caller decides what it weighs)."""
        self.net.train()
        z = z_sent.detach().requires_grad_(True)
        mse = F.mse_loss(self.net(z), x)
        params = list(self.net.parameters())
        grads = torch.autograd.grad(mse, [z, *params])
        for p, g in zip(params, grads[1:]):
            p.grad = g
        self.optimizer.step()
        return float(mse.detach()), grads[0]

    def state(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])


class ChannelGate(nn.Module):
    """A learned score per channel: the `keep` highest-scoring channels pass unchanged, the others
    are exactly zero (so they need not be sent).

    The selection is hard, so the scores learn through a straight-through estimate: the forward
    adds z * (sigmoid(s) - sigmoid(s).detach()), which is zero in value, so a channel's score
    gets sigmoid'(s) times the loss's sensitivity to scaling that channel, kept or not. A pruned
    channel's sensitivity is known because the cloud returns the gradient at every channel (it
    sees the pruned ones as zeros): a channel the task misses rises, one the simulated attacker
    exploits sinks. Scores start equal, and ties go to the lower index, so a run is replayable.

    `freeze` fixes the selection: from then on the same channels pass whatever the scores do, so
    that the decoder adapts to one set (`DefenseConfig.prune_freeze`).
    """

    def __init__(self, channels: int, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.scores = nn.Parameter(torch.zeros(channels))
        self.frozen: list[int] | None = None

    def kept(self) -> list[int]:
        """The channels that pass now, ascending (the order `splitnet.codec` sends them in)."""
        if self.frozen is not None:
            return list(self.frozen)
        ranked = torch.argsort(self.scores.detach(), descending=True, stable=True)
        return sorted(ranked[: self.keep].tolist())

    def freeze(self) -> None:
        self.frozen = self.kept()

    def forward(self, z: Tensor, kept: list[int]) -> Tensor:
        soft = torch.sigmoid(self.scores).view(1, -1, *([1] * (z.dim() - 2)))
        return keep_channels(z, kept) + z * (soft - soft.detach())
