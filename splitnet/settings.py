"""The names and plain settings a command line offers, apart from the torch code they select.

`splitnet.data`, `splitnet.codec` and `splitnet.models` import torch (seconds); a parser
built from them made `--help` slow. They take their names from here, and tests check
that every name has its implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
CODECS = ("fp32", "fp16", "bf16", "int8")
ARCHS = ("cnn", "resnet20", "vgg11_bn")  # splitnet.models.architectures()
MIN_WIDTH, MAX_WIDTH = 1 / 64, 4.0  # the channel multipliers an architecture takes


class InvalidSetting(ValueError):
    """A config field out of range, raised by the config itself, so that the Python API, Ray runs
    and sweeps refuse exactly what the command lines refuse.

    `field` is the first bad field. The message names fields through a speller: `str(err)`
    names them as the Python API does (`EdgeConfig.epochs must be >= 1`), and a command line
    passes its own speller to `message` to name its flags (`--epochs must be >= 1`).
    """

    def __init__(self, config: str, field: str, explain: Callable[[Callable[[str], str]], str]) -> None:
        self.config, self.field, self._explain = config, field, explain
        super().__init__(explain(lambda name: f"{config}.{name}"))

    def message(self, spell: Callable[[str], str]) -> str:
        """The message with every field spelt by `spell` (e.g. a command line's flag of the field)."""
        return self._explain(spell)


# (field, valid, explain): explain writes the message, spelling fields with the function it gets
Check = tuple[str, bool, Callable[[Callable[[str], str]], str]]


def require(config: str, checks: Iterable[Check]) -> None:
    """Raise InvalidSetting for the first check that fails."""
    for field, ok, explain in checks:
        if not ok:
            raise InvalidSetting(config, field, explain)


def require_fields(config: Any, checks: Iterable[tuple[str, bool, str]]) -> None:
    """For (field, valid, what it must be) checks of `config`'s fields: raise InvalidSetting
    `<field> must be <expected>, got <value>` for the first that fails."""
    def must_be(field: str, expected: str) -> Callable[[Callable[[str], str]], str]:
        return lambda name: f"{name(field)} must be {expected}, got {getattr(config, field)!r}"

    require(type(config).__name__, [(field, ok, must_be(field, expected)) for field, ok, expected in checks])


def at_least(field: str, value: int | float, lowest: int) -> Check:
    """The check `<field> must be >= <lowest>`."""
    return field, value >= lowest, lambda name: f"{name(field)} must be >= {lowest}"


def width_check(width: Any) -> Check:
    """The width a model takes; SplitSpec and EdgeConfig both check it (the latter without torch)."""
    return ("width", finite(width) and MIN_WIDTH <= width <= MAX_WIDTH,
            lambda name: f"{name('width')} {width} must lie in [{MIN_WIDTH}, {MAX_WIDTH}]")


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
        require_fields(self, obfuscation_checks(self.noise, self.noise_kind, self.dropout, self.topk))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ObfuscationConfig":
        """The obfuscation part of a defense record (e.g. the `defense` an encoder file holds);
        other keys (NoPeek, CEM) are training-time losses that never touch the wire."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})
