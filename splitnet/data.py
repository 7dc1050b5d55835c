"""Datasets, all served as float images in [0, 1] (no normalisation).

Keeping pixels in [0, 1] end to end means attack metrics are computed on exactly what
the edge saw, with data range 1.0, and no de-normalisation step can be forgotten; the
batch norm after the first convolution does the centring a normalisation would.

`digits` ships inside scikit-learn and is the default. The torchvision datasets and
ImageFolder trees load from `data_root`; nothing downloads unless `download=True`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset, TensorDataset

from splitnet import compat  # noqa: F401  (must precede torchvision)
from splitnet.settings import DATASETS, DatasetNotFound, DataSpec


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]


def load(spec: DataSpec) -> Splits:
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; choose one of {list(DATASETS)}")
    if spec.name == "digits":
        return _digits(spec)
    if spec.name == "imagefolder":
        return _imagefolder(spec)
    return _torchvision_set(spec)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits (values 0-16) and their labels, as scikit-learn's `load_digits`
    returns them. Read from the CSV scikit-learn ships, without importing scikit-learn:
    its import (scipy included) costs more CPU than the rest of a short edge-client run,
    and every edge, attacker and test process loads digits. `load_digits` is the fallback
    where the file is not where scikit-learn keeps it."""
    package = importlib.util.find_spec("sklearn")
    if package is None:
        raise ModuleNotFoundError("dataset 'digits' comes with scikit-learn", name="sklearn")
    csv = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(csv, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits(spec: DataSpec) -> Splits:
    side = spec.image_size or 16
    images, labels = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(labels, dtype=torch.long)
    train_idx, test_idx = _split_indices(len(y), spec)
    return Splits(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), 10,
                  (1, side, side))


def _split_indices(n: int, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.split_seed))
    n_test = int(round(n * spec.test_fraction))
    return perm[n_test:], perm[:n_test]


_TV_SETS = {
    "mnist": ("MNIST", 10, (1, 28, 28)),
    "fashion-mnist": ("FashionMNIST", 10, (1, 28, 28)),
    "cifar10": ("CIFAR10", 10, (3, 32, 32)),
    "cifar100": ("CIFAR100", 100, (3, 32, 32)),
}


def _torchvision_set(spec: DataSpec) -> Splits:
    import torchvision
    from torchvision import transforms

    root = spec.required_root()
    cls_name, classes, shape = _TV_SETS[spec.name]
    cls = getattr(torchvision.datasets, cls_name)
    tf = transforms.ToTensor()
    try:
        train = cls(str(root), train=True, transform=tf, download=spec.download)
        test = cls(str(root), train=False, transform=tf, download=spec.download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFound(f"{spec.name!r} not found under {root}: pass --data-root pointing at the folder "
                              f"that holds it, or --download to fetch it there ({err})") from None
    return Splits(train, test, classes, shape)


def _imagefolder(spec: DataSpec) -> Splits:
    """`root/train` + `root/test` trees if present, else one tree split by `test_fraction`."""
    from torchvision import datasets, transforms

    root = spec.required_root()
    side = spec.image_size or 32
    tf = transforms.Compose([transforms.Resize((side, side)), transforms.ToTensor()])
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = datasets.ImageFolder(str(root / "train"), transform=tf)
        test = datasets.ImageFolder(str(root / "test"), transform=tf)
        if train.classes != test.classes:
            raise ValueError(f"{root}/train and {root}/test have different class folders")
    else:
        try:
            full = datasets.ImageFolder(str(root), transform=tf)
        except FileNotFoundError as err:
            raise DatasetNotFound(f"no ImageFolder tree under {root} ({err}); pass --data-root DIR with one "
                                  "sub-folder per class") from None
        train_idx, test_idx = _split_indices(len(full), spec)
        train, test = Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist())
        train.classes = full.classes  # type: ignore[attr-defined]
    channels = train[0][0].shape[0]
    classes = len(train.classes)  # type: ignore[attr-defined]
    return Splits(_in_memory(train), _in_memory(test), classes, (channels, side, side))


MAX_IN_MEMORY_BYTES = 1 << 30


class _Uint8Images(Dataset):
    """Decoded images kept as uint8 (a quarter of float32's memory), served as floats in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index].float() / 255.0, int(self.labels[index])


def _in_memory(dataset: Dataset) -> Dataset:
    """Decode an image tree once instead of every epoch: for CIFAR-10's 50,000 JPEGs that is 16 s
    an epoch saved on 2 cores (a 36 s epoch at width 0.25). Trees that would not fit in
    MAX_IN_MEMORY_BYTES stay on disk. ToTensor's x/255 round-trips exactly through uint8."""
    first = dataset[0][0]
    if len(dataset) * first.numel() > MAX_IN_MEMORY_BYTES:  # type: ignore[arg-type]
        return dataset
    loader = DataLoader(dataset, batch_size=512)
    images, labels = zip(*((torch.round(x * 255).to(torch.uint8), y) for x, y in loader))
    return _Uint8Images(torch.cat(images), torch.cat(labels))


def shard(dataset: Dataset, index: int, count: int, seed: int = 0) -> Subset:
    """The `index`-th of `count` disjoint IID shards (for many clients)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    return Subset(dataset, perm[index::count])


AUGMENT_PADDING = 4


def augment(image: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    """Random crop after zero-padding by 4 and a random horizontal flip (the CIFAR recipe),
    drawn from (seed, epoch, index) alone.

    A pure function of those three, so the evaluation harness can rebuild the exact pixels a
    captured training step carried (it knows the seed from the report, the epoch and index
    from the replayed order) and score reconstructions against what was really sent.
    """
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (1 << 63))
    top, left = torch.randint(0, 2 * AUGMENT_PADDING + 1, (2,), generator=g).tolist()
    flip = bool(torch.randint(0, 2, (1,), generator=g))
    h, w = image.shape[-2:]
    out = TF.crop(TF.pad(image, [AUGMENT_PADDING]), top, left, h, w)
    return TF.horizontal_flip(out) if flip else out


class Augmented(Dataset):
    """A training set seen through `augment`; the trainer sets `epoch` before each pass."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 1

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return augment(x, self.seed, self.epoch, index), y


GREY_SAMPLE = 32  # images looked at to tell a grey set from a colour one


def is_grey(dataset: Dataset, sample: int = GREY_SAMPLE) -> bool:
    """One channel, or three equal ones on `sample` images spread over the set.

    Not the channel count alone: torchvision's ImageFolder loader converts every image to
    RGB, so a folder of grey PNGs arrives with three (identical) channels. An empty set is
    not grey (nothing says so).
    """
    size = len(dataset)  # type: ignore[arg-type]
    for index in torch.linspace(0, size - 1, min(size, sample)).long().tolist():
        x = dataset[index][0]
        if not all(torch.equal(x[0], channel) for channel in x[1:]):
            return False
    return size > 0


def augment_by_default(dataset: Dataset) -> bool:
    """`--augment auto`: on for colour images (CIFAR-style sets), off for grey ones (digits, and
    grey images an ImageFolder converted to RGB): a 4-pixel crop of a small grey image cuts
    strokes and shapes off (docs/TRAINING.md, "Augmentation")."""
    return not is_grey(dataset)


# A pass's last batch smaller than this, and than 1/8 of a batch, is left out of it (shuffled,
# so a different few samples each pass). One sample in a step of its own wrecked training: a
# grey two-class set of 193 training images at batch 64 (64 + 64 + 64 + 1) ended at chance at
# every seed tried, the same images at batch 50 (last batch 43) at test accuracy 0.88-0.98
# (docs/TRAINING.md, "Short last batch").
MIN_LAST_BATCH = 8


def batches_per_pass(size: int, batch_size: int) -> int:
    """How many batches `training_loader` makes of `size` samples: ceil(size / batch_size), less
    a last batch under min(MIN_LAST_BATCH, batch_size // 8) (never the only one)."""
    full, tail = divmod(size, batch_size)
    return full + (tail > 0 and (tail >= min(MIN_LAST_BATCH, batch_size // 8) or full == 0))


class _Batches(Sampler):
    """Shuffled batches of `batch_size` indices, `batches_per_pass` of them."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        self.batches = BatchSampler(RandomSampler(range(size), generator=generator), batch_size, drop_last=False)
        self.count = batches_per_pass(size, batch_size)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        for number, batch in enumerate(self.batches):
            if number < self.count:
                yield batch


def training_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """The edge's shuffled training batches, the same order for the same seed.

    Defined once because the evaluation harness replays it: to score reconstructions of
    training traffic it must know which private images each training step carried. The
    loader and the sampler draw from the same generator, as DataLoader(shuffle=True) does, so
    the batches are those of DataLoader(shuffle=True, generator=...) less a short last one.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=_Batches(len(dataset), batch_size, generator),  # type: ignore[arg-type]
                      generator=generator)


def training_order(size: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The dataset indices of every batch `training_loader` yields, epoch after epoch.

    The loader runs over the indices themselves: its sampler and the seed draw each epoch
    makes do not depend on what the dataset holds, so the order is the edge's.
    """
    loader = training_loader(range(size), batch_size, seed)  # type: ignore[arg-type]
    while True:
        yield from loader


def labels(dataset: Dataset) -> torch.Tensor:
    """Every label of `dataset`, in order; read from where the dataset keeps them, so that no image
    is decoded to list them."""
    if isinstance(dataset, _Uint8Images):
        return dataset.labels.clone()
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].clone()
    if getattr(dataset, "targets", None) is not None:
        return torch.as_tensor(dataset.targets)  # type: ignore[attr-defined]
    return torch.tensor([int(y) for _, y in dataset])  # type: ignore[union-attr]


def stratified(targets: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` images of every class (all of a class that has fewer), drawn with
    `seed` independently of anything else, in ascending order: a scoring sample that is the same
    for every run on the same split and does not weigh the classes by where they sit in it (an
    ImageFolder test split is sorted by class)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = [members[torch.randperm(len(members), generator=generator)[:per_class]]
              for members in (torch.nonzero(targets == c).flatten() for c in targets.unique(sorted=True))]
    return torch.cat(chosen).sort().values
