"""One attacker, prepared once and applied to every captured batch; pure torch.

What each method needs, by threat model (README.md, "Attacking your own deployment"):
- `inversion` (eavesdropper or white-box): the encoder + auxiliary images; trains an
  inverse network, noise-aware by default (the edge's obfuscation on its training z).
- `rmle` (white-box): the encoder; optimises each image against its features.
- `shadow` (curious cloud): the cloud's decoder + labelled auxiliary data; trains a
  shadow encoder through the frozen decoder, then an inverse network on the shadow.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from torch import Tensor, nn
from torch.utils.data import Dataset

from attacks.config import AttackConfig
from attacks.inversion import reconstruct, train_inversion
from attacks.rmle import rmle
from attacks.shadow import train_shadow_encoder
from splitnet import checkpoint_file, encoder_file, models
from splitnet.inverse_models import InversionDecoder

log = logging.getLogger(__name__)

def load_encoder(path: str) -> tuple[nn.Module, models.SplitSpec, dict]:
    """An edge encoder saved by `edge-client --save-encoder`: (encoder, spec, defense settings)."""
    saved = encoder_file.read(path)
    return saved.split.encoder, saved.spec, saved.defense


def load_decoder(path: str) -> tuple[nn.Module, models.SplitSpec]:
    """The cloud's decoder from a `cloud-server` job checkpoint (what a curious cloud holds)."""
    state = checkpoint_file.read(path)
    spec = models.SplitSpec.from_dict(state["spec"])
    decoder = models.build(spec).decoder
    decoder.load_state_dict(state["decoder"])
    return decoder.eval(), spec


class Attacker:
    def __init__(self, config: AttackConfig, spec: models.SplitSpec, aux: Dataset, *,
                 encoder: nn.Module | None = None, cloud_decoder: nn.Module | None = None,
                 obfuscate: Callable[[Tensor], Tensor] | None = None) -> None:
        needs = {"inversion": encoder, "rmle": encoder, "shadow": cloud_decoder}[config.method]
        if needs is None:
            what = "the cloud's decoder (--decoder)" if config.method == "shadow" else "the encoder (--encoder)"
            raise ValueError(f"the {config.method} attack needs {what}")
        self.spec, self.aux = spec.resolved(), aux
        self.config = config.resolved(self.spec.input_shape)
        self.encoder, self.cloud_decoder = encoder, cloud_decoder
        self.obfuscate = obfuscate if config.noise_aware else None
        self.feature_shape = models.build(self.spec).feature_shape
        self._inverse: InversionDecoder | None = None
        self.fit_seconds = 0.0

    def fit(self) -> "Attacker":
        start = time.perf_counter()
        cfg = self.config
        if cfg.method == "shadow":
            def factory() -> nn.Module:
                return models.build(self.spec).encoder

            self.encoder = train_shadow_encoder(factory, self.cloud_decoder, self.aux, self.obfuscate,
                                                cfg.shadow_epochs, seed=cfg.seed, progress=cfg.progress)
        if cfg.method in ("inversion", "shadow"):
            self._inverse = train_inversion(self.encoder, self.aux, self.feature_shape, self.spec.input_shape,
                                            self.obfuscate, cfg.epochs, seed=cfg.seed, progress=cfg.progress,
                                            width=cfg.width, blocks=cfg.blocks)
        self.fit_seconds = time.perf_counter() - start
        log.info("%s attacker ready in %.1f s", cfg.method, self.fit_seconds)
        return self

    def reconstruct(self, features: Tensor) -> Tensor:
        if self._inverse is not None:
            return reconstruct(self._inverse, features)
        cfg = self.config
        return rmle(self.encoder, features, self.spec.input_shape, iterations=cfg.rmle_iterations, lr=cfg.rmle_lr,
                    tv_weight=cfg.rmle_tv_weight)

    def settings(self) -> dict:
        """What produced the reconstructions, resolved (no default left implicit): for the run's record.
        Only the settings the method used, so no number in a result describes a network that never ran."""
        cfg = self.config
        if cfg.method == "rmle":
            return {"rmle_iterations": cfg.rmle_iterations, "rmle_lr": cfg.rmle_lr,
                    "rmle_tv_weight": cfg.rmle_tv_weight}
        inverse = {"inverse_blocks": cfg.blocks, "inverse_width": cfg.width, "inverse_epochs": cfg.epochs,
                   "inverse_loss_history": list(self._inverse.loss_history) if self._inverse is not None else []}
        return {**inverse, "shadow_epochs": cfg.shadow_epochs} if cfg.method == "shadow" else inverse
