"""Model zoo: each architecture is a list of named stages, and a cut splits it in two.

The public registry: `architectures()` names them, `cut_points(arch)` lists an architecture's
cuts, `describe(arch, ...)` adds each cut's feature shape, the default cut and the classifier
head, and `build(spec)` builds both halves of a `SplitSpec`. The builders behind it are private.

Both ends build the same architecture from the same spec; the edge keeps the stages up
to and including the cut (the encoder F_e), the cloud keeps the rest (the decoder F_d).
In the U-shaped split (`head_cut`, Vepakomma et al. 2018) the cloud keeps only the stages
after the cut up to and including `head_cut` (the middle) and the edge also keeps the rest
with the classifier (the head), so that the labels and the loss stay on the device.
A bottleneck of C channels with a sigmoid can be inserted at the cut so that features
live in [0, 1] and a noise sigma has a fixed meaning (the CEM / ResSFL setting); the
cloud then starts with the matching expansion back to the stage's width.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from splitnet.schedule import LrSchedule
from splitnet.settings import Check, at_least, require, width_check

Stage = tuple[str, nn.Module]


@dataclass(frozen=True)
class SplitSpec:
    """Everything needed to rebuild the same split model on either end."""

    arch: str = "cnn"
    cut: str = ""  # empty: the architecture's default cut
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 16, 16)
    bottleneck: int = 0  # 0: none; C > 0: conv to C channels + sigmoid at the cut
    width: float = 1.0  # channel multiplier: 0.25 makes vgg11_bn train on 2 CPU cores in minutes per epoch
    head_cut: str = ""  # empty: the vanilla split; a stage after `cut`: the U-shaped split, the cloud's middle ends there

    @property
    def u_shaped(self) -> bool:
        return bool(self.head_cut)

    def as_dict(self) -> dict:
        """Plain values, for JSON reports and weights_only checkpoints (`head_cut` only where set: the
        vanilla split's dict is what it was before the U-shaped one)."""
        return {"arch": self.arch, "cut": self.cut, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "bottleneck": self.bottleneck, "width": self.width,
                **({"head_cut": self.head_cut} if self.head_cut else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "SplitSpec":
        return cls(d["arch"], d["cut"], int(d["num_classes"]), tuple(int(v) for v in d["input_shape"]),
                   int(d.get("bottleneck") or 0), float(d.get("width") or 1.0), str(d.get("head_cut") or ""))

    def differs(self, other: "SplitSpec") -> tuple[str, object, object] | None:
        """The first field in which `other` is another model than this one, with both values
        (cuts resolved: "" and the default cut are the same model); None if they are one model."""
        mine, theirs = self.resolved(), other.resolved()
        for name in ("arch", "cut", "num_classes", "input_shape", "bottleneck", "width", "head_cut"):
            if getattr(mine, name) != getattr(theirs, name):
                return name, getattr(mine, name), getattr(theirs, name)
        return None

    def resolved(self) -> "SplitSpec":
        """The same spec with the default cut filled in and checked (InvalidSetting naming the field)."""
        require("SplitSpec", [("arch", self.arch in _REGISTRY,
                               lambda name: f"unknown arch {self.arch!r}; choose one of {architectures()}")])
        cut = self.cut or _REGISTRY[self.arch].default_cut
        require("SplitSpec", [cut_check(self.arch, cut),
                              at_least("bottleneck", self.bottleneck, 0),
                              width_check(self.width)])
        if self.head_cut:
            require("SplitSpec", [head_cut_check(self.arch, cut, self.head_cut)])
        return SplitSpec(self.arch, cut, self.num_classes, tuple(self.input_shape), self.bottleneck, self.width,
                         self.head_cut)


@dataclass(frozen=True)
class OptimSpec:
    """SGD settings; the edge's encoder and the cloud's decoder use the same ones."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: LrSchedule = LrSchedule()

    def make(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_at(self, step_id: int) -> float:
        """The rate of the client's step `step_id` (both ends call this with the same id)."""
        return self.lr * self.schedule.factor(step_id)


@dataclass
class SplitModel:
    encoder: nn.Module
    decoder: nn.Module  # the cloud's part: everything after the cut, or the middle of a U-shaped split
    feature_shape: tuple[int, ...]
    spec: SplitSpec
    head: nn.Module | None = None  # the edge's head of a U-shaped split (None: vanilla)
    output_shape: tuple[int, ...] = ()  # of the decoder's output, batch dim dropped


@dataclass(frozen=True)
class _Arch:
    stages: Callable[[int, int, float], tuple[list[Stage], nn.Module]]  # (in_ch, classes, width)
    default_cut: str


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _cnn(in_ch: int, classes: int, width: float) -> tuple[list[Stage], nn.Module]:
    c16, c32, c64, c128 = (_scaled(c, width) for c in (16, 32, 64, 128))
    stages = [
        ("conv1", nn.Sequential(*_conv_bn_relu(in_ch, c16))),
        ("block1", nn.Sequential(*_conv_bn_relu(c16, c32), nn.MaxPool2d(2))),
        ("block2", nn.Sequential(*_conv_bn_relu(c32, c64), nn.MaxPool2d(2))),
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c64, c128), nn.ReLU(inplace=True),
                         nn.Linear(c128, classes))
    return stages, head


_VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _vgg11_bn(in_ch: int, classes: int, width: float) -> tuple[list[Stage], nn.Module]:
    """CIFAR-style VGG11-bn (cfg A) with the 512-wide head of the CEM paper, every width scaled."""
    stages: list[Stage] = []
    cin, conv_i, pool_i = in_ch, 0, 0
    for v in _VGG11_CFG:
        if v == "M":
            pool_i += 1
            stages.append((f"pool{pool_i}", nn.MaxPool2d(2)))
        else:
            conv_i += 1
            cout = _scaled(int(v), width)
            stages.append((f"conv{conv_i}", nn.Sequential(*_conv_bn_relu(cin, cout))))
            cin = cout
    hidden = _scaled(512, width)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))
    return stages, head


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def _resnet20(in_ch: int, classes: int, width: float) -> tuple[list[Stage], nn.Module]:
    def layer(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1), _BasicBlock(cout, cout, 1))

    c16, c32, c64 = (_scaled(c, width) for c in (16, 32, 64))
    stages = [
        ("stem", nn.Sequential(*_conv_bn_relu(in_ch, c16))),
        ("layer1", layer(c16, c16, 1)),
        ("layer2", layer(c16, c32, 2)),
        ("layer3", layer(c32, c64, 2)),
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c64, classes))
    return stages, head


_REGISTRY: dict[str, _Arch] = {
    "cnn": _Arch(_cnn, "block1"),
    "vgg11_bn": _Arch(_vgg11_bn, "pool2"),
    "resnet20": _Arch(_resnet20, "layer1"),
}


def architectures() -> tuple[str, ...]:
    """The names `SplitSpec.arch` takes, sorted."""
    return tuple(sorted(_REGISTRY))


def cut_points(arch: str) -> list[str]:
    """The valid cut names of an architecture, input side first."""
    return list(_cut_points(arch))


def cut_check(arch: str, cut: str) -> Check:
    """Whether `cut` is a cut of `arch`: SplitSpec and EdgeConfig refuse others with this message."""
    return ("cut", cut in _cut_points(arch),
            lambda name: f"unknown cut {cut!r} for arch {arch!r}; valid cuts: {cut_points(arch)}")


def default_cut(arch: str) -> str:
    return _REGISTRY[arch].default_cut


def head_cuts(arch: str, cut: str) -> list[str]:
    """Where the cloud's middle of a U-shaped split may end: a stage after `cut` (the last one leaves
    the edge the classifier alone)."""
    points = list(_cut_points(arch))
    return points[points.index(cut) + 1:] if cut in points else []


def head_cut_check(arch: str, cut: str, head_cut: str) -> Check:
    return ("head_cut", head_cut in head_cuts(arch, cut),
            lambda name: f"head_cut {head_cut!r} must be a stage of {arch!r} after cut {cut!r}: one of "
                         f"{head_cuts(arch, cut)}")


@dataclass(frozen=True)
class ArchInfo:
    """What `describe` tells about an architecture at one input shape, class count and width."""

    arch: str
    default_cut: str
    cuts: dict[str, tuple[int, ...]]  # cut name -> shape of the features it sends (no batch dim), input side first
    head: tuple[str, ...]  # the classifier head's layers, which end the decoder after the last stage


def describe(arch: str, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
             width: float = 1.0) -> ArchInfo:
    """An architecture's cut points with the feature shape each sends for inputs of `input_shape`
    (channels, height, width; default a CIFAR image, which every architecture takes), its default
    cut and its head: what to know to choose a cut (the wire carries the feature shape's size per
    sample) without building a split model per cut. An input too small for a stage: ValueError."""
    spec = SplitSpec(arch, "", num_classes, tuple(input_shape), width=width).resolved()
    with private_rng():  # building layers draws weights: keep callers' seeds intact
        stages, head = _REGISTRY[arch].stages(input_shape[0], num_classes, width)
    cuts, x = {}, torch.zeros(1, *input_shape)
    with torch.no_grad():
        for name, stage in stages:
            try:
                x = stage.eval()(x)
            except RuntimeError as err:  # e.g. a pooling stage left with less than one pixel
                raise ValueError(f"input {tuple(input_shape)} is too small for {arch} at {name}: {err}") from None
            cuts[name] = tuple(x.shape[1:])
    return ArchInfo(arch, spec.cut, cuts, tuple(repr(layer) for layer in head))


_RNG = threading.RLock()


@contextlib.contextmanager
def private_rng(seed: int | None = None) -> Iterator[None]:
    """Draw from torch's global CPU generator, seeded with `seed` if given, and leave it as it was.

    `torch.random.fork_rng` alone is not enough across threads: it puts the generator's state
    back on exit, so two threads that fork at once overwrite each other's draws (two server
    threads building jobs at the same time got weights other than their seeds'). So one
    thread at a time; re-entrant, as building a model looks up its cut points.
    """
    with _RNG, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@functools.cache
def _cut_points(arch: str) -> tuple[str, ...]:
    with private_rng():  # building layers draws weights: keep callers' seeds intact
        stages, _ = _REGISTRY[arch].stages(1, 2, 1.0)
    return tuple(name for name, _ in stages)


def build(spec: SplitSpec) -> SplitModel:
    """Build both halves and measure the feature shape at the cut (batch dim dropped)."""
    spec = spec.resolved()
    stages, head = _REGISTRY[spec.arch].stages(spec.input_shape[0], spec.num_classes, spec.width)
    names = [name for name, _ in stages]
    idx = names.index(spec.cut) + 1
    end = names.index(spec.head_cut) + 1 if spec.u_shaped else len(stages)
    enc_layers = [m for _, m in stages[:idx]]
    dec_layers = [m for _, m in stages[idx:end]]
    width = _feature_shape(nn.Sequential(*enc_layers), spec.input_shape)[0]
    if spec.bottleneck:
        enc_layers += [nn.Conv2d(width, spec.bottleneck, 3, 1, 1), nn.BatchNorm2d(spec.bottleneck), nn.Sigmoid()]
        dec_layers = [nn.Sequential(*_conv_bn_relu(spec.bottleneck, width))] + dec_layers
    encoder = nn.Sequential(*enc_layers)
    edge_head = nn.Sequential(*(m for _, m in stages[end:]), head) if spec.u_shaped else None
    decoder = nn.Sequential(*dec_layers) if spec.u_shaped else nn.Sequential(*dec_layers, head)
    feature_shape = _feature_shape(encoder, spec.input_shape)
    return SplitModel(encoder, decoder, feature_shape, spec, edge_head, _feature_shape(decoder, feature_shape))


def _feature_shape(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of `module` for one input of `input_shape` (batch dim dropped), in eval mode."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        shape = tuple(module(torch.zeros(1, *input_shape)).shape[1:])
    module.train(was_training)
    return shape


def full_model(split: SplitModel) -> nn.Module:
    """Encoder and decoder (and a U-shaped split's head) as one module, for the single-process baseline."""
    return nn.Sequential(split.encoder, split.decoder, *([split.head] if split.head is not None else []))
