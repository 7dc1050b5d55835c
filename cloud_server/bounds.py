"""What a job may be: the numbers a decoder and its optimizer are built from, bounded.

A decoder and a dummy forward pass are allocated from these numbers, so unbounded ones
would let a peer exhaust memory, and an optimizer with a negative rate or momentum
trains nothing sensible. They reach the server two ways, checked by the same rules: in a
peer's `SessionSpec` (`cloud_server.servicer`, INVALID_ARGUMENT) and in a checkpoint file
read at start (`cloud_server.checkpoints`, CheckpointError). ValueErrors name the field.
"""

from __future__ import annotations

import math
from typing import Sequence

MAX_NAME_CHARS = 128  # a SessionSpec's job, client id, arch, cut and codec: they end up in logs and replies
MAX_CLASSES = 100_000
MAX_INPUT_ELEMENTS = 2**22  # C * H * W, e.g. 3 x 1024 x 1024
MAX_BOTTLENECK = 4096


def check_model(num_classes: int, input_shape: Sequence[int], bottleneck: int) -> None:
    """The sizes the decoder and its dummy forward pass are allocated from."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes: {num_classes} must lie in [2, {MAX_CLASSES}]")
    shape = list(input_shape)
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"input_shape: {shape[:4]} must be [C, H, W] with positive sides and at most "
                         f"{MAX_INPUT_ELEMENTS} elements")
    if not 0 <= bottleneck <= MAX_BOTTLENECK:
        raise ValueError(f"bottleneck: {bottleneck} must lie in [0, {MAX_BOTTLENECK}]")


def check_optim(lr: float, momentum: float, weight_decay: float) -> None:
    """SGD's settings, as the edge's encoder uses them too: torch accepts lr 0, which trains nothing."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: {lr} must be finite and > 0")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: {value} must be finite and >= 0")
