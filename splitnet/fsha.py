"""Feature-space hijacking (FSHA; Pasquini, Ateniese and Bernaschi, "Unleashing the Tiger:
Inference Attacks on Split Learning", CCS 2021), the malicious cloud's algorithm, pure torch.

An attack, kept here and not in `attacks/` because the program that runs it is the cloud
(`cloud-server --hijack fsha`), and no role imports another (docs/ARCHITECTURE.md §2): the
lying server needs it, the attacker's harness only scores what it recorded (the reconstruction
folder of `splitnet.recon_file`).

The server never trains the client's task. On its own public images it trains
- a pilot encoder f~ (the client's encoder architecture: the same feature shape and range)
  and an inverse decoder g (`splitnet.inverse_models.InversionDecoder`) as an autoencoder,
  so that g inverts the pilot's feature space;
- a critic D (WGAN-GP) telling the pilot's features from the client's.
To every training step it answers with d(-mean D(z)) / dz: the gradient that moves the
client's encoder towards features D takes for the pilot's. Once they land in the pilot's
space, g(z) is the client's private image. The labels play no part, which is what
SplitGuard (`edge_client.detect`) looks for.

Settings differ from the paper's (TensorFlow, Adam on both sides, tens of thousands of
steps): the client here is an unmodified edge with SGD at lr 0.05 and momentum 0.9, so the
critic's gradient is scaled by `grad_scale` to the size of an honest cross-entropy
gradient (a much larger one would show in any gradient-norm monitor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from splitnet.inverse_models import InversionDecoder
from splitnet.models import SplitSpec, build, private_rng


@dataclass(frozen=True)
class FshaSettings:
    """The attack's own hyperparameters (documented defaults: docs/ATTACKS_AND_METRICS.md §6)."""

    ae_lr: float = 1e-3  # Adam rate of the pilot encoder and inverse decoder
    critic_lr: float = 1e-4  # Adam rate of the critic
    gp_weight: float = 10.0  # WGAN-GP gradient penalty
    grad_scale: float = 1.0  # multiplies the gradient sent to the client
    ae_steps: int = 1  # autoencoder steps per client step
    decoder_width: int = 64  # channels of the inverse decoder
    critic_width: int = 64  # channels of the critic


class Critic(nn.Module):
    """D: features -> a score. No batch norm (the gradient penalty is per sample)."""

    def __init__(self, feature_shape: tuple[int, ...], width: int) -> None:
        super().__init__()
        channels = feature_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z).squeeze(1)


@dataclass
class HijackStep:
    """What one client step gives: the gradient to send back and the attack's figures."""

    grad: Tensor
    ae_loss: float  # the pilot autoencoder's reconstruction MSE on the public batch
    critic_loss: float  # Wasserstein estimate plus penalty
    client_loss: float  # -mean D(client features): what the client is made to minimise


class FeatureSpaceHijack:
    """The three networks and their optimizers, fed the server's public images (a tensor [N, C, H, W]
    in [0, 1], drawn in seeded random batches)."""

    def __init__(self, spec: SplitSpec, public: Tensor, settings: FshaSettings = FshaSettings(),
                 seed: int = 0, device: str = "cpu") -> None:
        if public.dim() != 4 or tuple(public.shape[1:]) != tuple(spec.input_shape):
            raise ValueError(f"public images {list(public.shape)} do not match the client's input shape "
                             f"{list(spec.input_shape)}")
        self.settings, self.device = settings, device
        self.public = public
        with private_rng(seed + 7919):  # other server threads keep their RNG state
            split = build(spec)
            self.feature_shape = tuple(split.feature_shape)
            self.pilot = split.encoder.to(device)  # the client's architecture: same shape, same range
            self.inverse = InversionDecoder(self.feature_shape, tuple(spec.input_shape),  # type: ignore[arg-type]
                                            settings.decoder_width).to(device)
            self.critic = Critic(self.feature_shape, settings.critic_width).to(device)
        self.ae_optimizer = torch.optim.Adam([*self.pilot.parameters(), *self.inverse.parameters()],
                                             lr=settings.ae_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=settings.critic_lr, betas=(0.5, 0.9))
        self.generator = torch.Generator().manual_seed(seed)

    def _public_batch(self, size: int) -> Tensor:
        index = torch.randint(len(self.public), (size,), generator=self.generator)
        return self.public[index].to(self.device)

    def step(self, z_client: Tensor) -> HijackStep:
        """One server step on the client's features: train the autoencoder and the critic, and return
        the hijacking gradient with respect to `z_client`."""
        s = self.settings
        z = z_client.detach().to(self.device).requires_grad_(True)
        self.pilot.train()
        self.inverse.train()
        ae_loss = torch.zeros(())
        for _ in range(s.ae_steps):
            x_pub = self._public_batch(len(z))
            ae_loss = F.mse_loss(self.inverse(self.pilot(x_pub)), x_pub)
            self.ae_optimizer.zero_grad(set_to_none=True)
            ae_loss.backward()
            self.ae_optimizer.step()
        with torch.no_grad():
            z_pilot = self.pilot(self._public_batch(len(z)))
        client_loss = -self.critic(z).mean()
        (grad,) = torch.autograd.grad(client_loss, z)
        critic_loss = (self.critic(z.detach()).mean() - self.critic(z_pilot).mean()
                       + s.gp_weight * self._penalty(z.detach(), z_pilot))
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        return HijackStep(grad.mul(s.grad_scale).detach().cpu(), float(ae_loss.detach()), float(critic_loss.detach()),
                          float(client_loss.detach()))

    def _penalty(self, fake: Tensor, real: Tensor) -> Tensor:
        """WGAN-GP: (|grad D| - 1)^2 on points between the client's and the pilot's features."""
        mix = torch.rand(len(fake), *([1] * (fake.dim() - 1)), generator=self.generator).to(self.device)
        between = (mix * real + (1 - mix) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(between).sum(), between, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    @torch.no_grad()
    def reconstruct(self, z_client: Tensor) -> Tensor:
        """g(z): the attacker's picture of the private images behind `z_client`, in [0, 1]."""
        self.inverse.eval()
        return self.inverse(z_client.to(self.device)).cpu()
