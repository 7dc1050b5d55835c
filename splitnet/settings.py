"""The names and plain settings a command line offers, apart from the torch code they select.

`splitnet.data`, `splitnet.codec` and `splitnet.models` import torch (seconds); a parser
built from them made `--help` slow. They take their names from here, and tests check
that every name has its implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
CODECS = ("fp32", "fp16", "bf16", "int8")
ARCHS = ("cnn", "resnet20", "vgg11_bn")  # the keys of splitnet.models.ARCHS


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    data_root: str = ""
    download: bool = False
    image_size: int = 0  # digits: side after upsampling (default 16); imagefolder: resize side (default 32)
    test_fraction: float = 0.2  # for sets without an official test split
    split_seed: int = 0


NOISE_KINDS = ("gaussian", "laplace")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def obfuscation_checks(noise: Any, noise_kind: Any, dropout: Any, topk: Any) -> list[tuple[str, bool, str]]:
    """(field, valid, what it must be) for each setting; shared with the edge's DefenseConfig."""
    return [
        ("noise", finite(noise) and noise >= 0, "a finite number >= 0"),
        ("noise_kind", noise_kind in NOISE_KINDS, f"one of {NOISE_KINDS}"),
        ("dropout", finite(dropout) and 0 <= dropout < 1, "in [0, 1)"),
        ("topk", finite(topk) and 0 <= topk < 1, "in [0, 1)"),
    ]


@dataclass(frozen=True)
class ObfuscationConfig:
    noise: float = 0.0  # sigma: Gaussian std, or Laplace scale b
    noise_kind: str = "gaussian"
    dropout: float = 0.0  # p: share of features zeroed, no 1/(1-p) rescale
    topk: float = 0.0  # r: share of the smallest |features| zeroed per sample

    def __post_init__(self) -> None:
        for name, ok, expected in obfuscation_checks(self.noise, self.noise_kind, self.dropout, self.topk):
            if not ok:
                raise ValueError(f"ObfuscationConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ObfuscationConfig":
        """The obfuscation part of a defense record (e.g. the `defense` an encoder file holds);
        other keys (NoPeek, CEM) are training-time losses that never touch the wire."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})
