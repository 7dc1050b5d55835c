"""The names and plain settings a command line offers, apart from the torch code they select.

`splitnet.data`, `splitnet.codec` and `splitnet.models` import torch (seconds); a parser
built from them made `--help` slow. They take their names from here, and tests check
that every name has its implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
CODECS = ("fp32", "fp16", "bf16", "int8")
ARCHS = ("cnn", "resnet20", "vgg11_bn")  # the keys of splitnet.models.ARCHS


class DatasetNotFound(FileNotFoundError):
    """A dataset folder is missing; the message says which flag fixes it."""


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    data_root: str = ""
    download: bool = False
    image_size: int = 0  # digits: side after upsampling (default 16); imagefolder: resize side (default 32)
    test_fraction: float = 0.2  # for sets without an official test split
    split_seed: int = 0

    def required_root(self) -> Path | None:
        """The folder this set loads from (None for digits, which ships with scikit-learn), or
        DatasetNotFound naming the flag that fixes it. Here, without torch, so that a command
        refuses a missing folder before seconds of imports."""
        if self.name == "digits":
            return None
        if not self.data_root:
            raise DatasetNotFound(f"dataset {self.name!r} needs --data-root DIR (add --download to fetch it there)")
        root = Path(self.data_root)
        if not root.is_dir() and not self.download:
            raise DatasetNotFound(f"dataset folder {root} does not exist: pass --data-root pointing at it, "
                                  f"or --download to fetch {self.name!r} there")
        return root


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
