"""Attacks that reconstruct the edge's private images from split-layer features.

Pure torch, so any side of the system (an eavesdropping proxy, a curious cloud, an
offline evaluation) can run them: the training-based inverse network, white-box rMLE,
and the query-free shadow-encoder attack, plus the metrics every report scores with.
"""

from attacks.grid import save_grid
from attacks.inversion import reconstruct, train_inversion
from attacks.inversion_models import InversionDecoder
from attacks.metrics import SSIM_CONVENTION, per_image, score, ssim_map
from attacks.rmle import rmle, total_variation
from attacks.shadow import shadow_attack, train_shadow_encoder

__all__ = [
    "SSIM_CONVENTION", "InversionDecoder", "per_image", "reconstruct", "rmle", "save_grid", "score",
    "shadow_attack", "ssim_map", "total_variation", "train_inversion", "train_shadow_encoder",
]
