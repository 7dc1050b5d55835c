"""The names and plain settings a command line offers, apart from the torch code they select.

`splitnet.data`, `splitnet.codec` and `splitnet.models` import torch (seconds); a parser
built from them made `--help` slow. They take their names from here, and tests check
that every name has its implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

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
