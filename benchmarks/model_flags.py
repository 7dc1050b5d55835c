"""Which model the wire benchmarks (`transport.py`, `inference.py`, `floor.py`) measure, as one
set of flags they share, so that the three measure the same model and the floor's message sizes
are the split's own.

The default is the bundled digits cnn. `--cifar10 DIR` (an ImageFolder tree: train/<class>,
test/<class>) selects the model of the converged CIFAR-10 study (`examples/cifar10_converged.toml`):
vgg11_bn at width 0.25, cut at pool2 with the 8-channel bottleneck, 32-pixel images. Each of
`--arch`, `--cut`, `--width`, `--bottleneck` overrides the preset's value.

Imported by its siblings as scripts run (`python benchmarks/transport.py`), beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

from torch.utils.data import Subset

from splitnet import data

# A run's evaluation is not timed; on a large test set it would only make the benchmark slower.
EVAL_IMAGES = 512

PRESETS = {
    "digits": {"arch": "cnn", "cut": "", "width": 1.0, "bottleneck": 0},
    "cifar10": {"arch": "vgg11_bn", "cut": "pool2", "width": 0.25, "bottleneck": 8},
}


def add(p: argparse.ArgumentParser, cut: bool = True) -> None:
    """The model flags; `cut=False` where the script takes its cuts elsewhere (`inference.py --cuts`)."""
    g = p.add_argument_group("model (default: the digits cnn)")
    g.add_argument("--cifar10", metavar="DIR", default="",
                   help="the CIFAR-10 study's model on this ImageFolder tree (vgg11_bn, width 0.25, pool2, "
                        "bottleneck 8)")
    g.add_argument("--arch", default=None)
    if cut:
        g.add_argument("--cut", default=None)
    g.add_argument("--width", type=float, default=None)
    g.add_argument("--bottleneck", type=int, default=None)


def resolve(args: argparse.Namespace, **digits: object) -> argparse.Namespace:
    """Fill the model flags left unset from the preset (`digits`: the script's own defaults for
    the digits model, e.g. `inference.py`'s bottleneck 8); returns `args`."""
    preset = PRESETS["cifar10"] if args.cifar10 else {**PRESETS["digits"], **digits}
    for name, value in preset.items():
        if getattr(args, name, value) is None:
            setattr(args, name, value)
    return args


def data_spec(args: argparse.Namespace) -> data.DataSpec:
    if args.cifar10:
        return data.DataSpec(name="imagefolder", data_root=args.cifar10, image_size=32)
    return data.DataSpec()


@functools.lru_cache(maxsize=1)
def _load(spec: data.DataSpec) -> data.Splits:
    return data.load(spec)


def load(args: argparse.Namespace) -> data.Splits:
    """The data, its test set cut to EVAL_IMAGES (spread over the set, not its first class); loaded
    once per process (`floor.py` runs its siblings in its own: CIFAR-10 takes a while to decode)."""
    splits = _load(data_spec(args))
    step = max(1, len(splits.test) // EVAL_IMAGES)
    return dataclasses.replace(splits, test=Subset(splits.test, range(0, len(splits.test), step)[:EVAL_IMAGES]))


def argv(args: argparse.Namespace, *names: str) -> list[str]:
    """The model flags `names` (all four by default) as a sibling script takes them."""
    out = []
    for name in names or tuple(PRESETS["digits"]):
        out += [f"--{name}", str(getattr(args, name))]
    return out + (["--cifar10", args.cifar10] if args.cifar10 else [])
