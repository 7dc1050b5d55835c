"""Grey image sets are not augmented by `--augment auto`, and a test accuracy far below the
training accuracy is reported (`generalization_gap`, `warnings`) and logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from cloud_server.local import LocalCloud
from edge_client.config import EdgeConfig
from edge_client.report import GAP_WARNING, generalization
from edge_client.trainer import EdgeTrainer
from splitnet import data


def _write_folder(root, colour: bool, per_class: int = 6) -> None:
    """Two classes of small random PNGs: grey ("L") or colour ("RGB") files."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (20, 20, 3) if colour else (20, 20)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, "RGB" if colour else "L").save(root / name / f"{i}.png")


@pytest.mark.slow  # torchvision's import: seconds
@pytest.mark.parametrize("colour", [False, True])
def test_augment_auto_follows_the_pixels_not_the_channel_count(tmp_path, colour):
    """ImageFolder converts grey PNGs to three equal channels: still grey, so auto leaves them alone."""
    _write_folder(tmp_path, colour)
    spec = data.DataSpec("imagefolder", str(tmp_path), image_size=20)
    splits = data.load(spec)
    assert splits.input_shape == (3, 20, 20)  # the loader's RGB, either way
    trainer = EdgeTrainer(EdgeConfig(data=spec, augment="auto", progress=False), LocalCloud(), splits)
    assert trainer.augment is colour and (trainer.augmented is not None) is colour


def test_grey_digits_and_one_colour_image_among_grey_ones():
    digits = data.load(data.DataSpec("digits")).train
    assert data.is_grey(digits) and not data.augment_by_default(digits)
    grey = torch.rand(10, 1, 4, 4).expand(10, 3, 4, 4).clone()
    assert data.is_grey(TensorDataset(grey, torch.zeros(10)))
    grey[9, 0] += 0.1  # the last image has colour: sampled, so the set is colour
    assert not data.is_grey(TensorDataset(grey, torch.zeros(10)))


@pytest.mark.parametrize("train, test, warned", [(1.0, 0.275, True), (1.0, 0.75, False),
                                                  (0.9, 0.9 - GAP_WARNING, False), (None, 0.5, False)])
def test_generalization_gap_threshold(train, test, warned):
    gap, warnings = generalization(train, test)
    assert (gap is None) == (train is None)
    assert bool(warnings) is warned


@pytest.mark.slow
def test_a_run_that_does_not_generalise_says_so(caplog):
    """Digits, tested on its own training images with every label shifted by one: training
    accuracy high, test accuracy near 0; the report carries the gap and a warning, and the log
    a WARNING line."""
    torch.set_num_threads(1)
    splits = data.load(data.DataSpec("digits"))
    x, y = splits.train.tensors
    wrong = data.Splits(splits.train, TensorDataset(x[:300], (y[:300] + 1) % 10), 10, splits.input_shape)
    trainer = EdgeTrainer(EdgeConfig(epochs=3, progress=False), LocalCloud(), wrong)
    trainer.open()
    for _ in range(3):
        trainer.train_epoch()
    accuracy = trainer.evaluate()
    trainer.close()
    with caplog.at_level(logging.WARNING, logger="edge_client.trainer"):
        report = trainer.report(accuracy)
    train_accuracy = trainer.history[-1]["train_accuracy"]
    assert train_accuracy > 0.8 and accuracy < 0.2
    assert report["generalization_gap"] == pytest.approx(train_accuracy - accuracy)
    assert len(report["warnings"]) == 1 and "below training accuracy" in report["warnings"][0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == report["warnings"]


@pytest.mark.parametrize("size, lengths", [(193, [64, 64, 64]), (200, [64, 64, 64, 8]), (5, [5])])
def test_training_batches_leave_out_a_short_last_batch_in_the_same_order(size, lengths):
    """193 = 3 x 64 + 1: the old loader ended each pass with a step on one sample, which kept a
    small grey set at chance. The batches kept are DataLoader(shuffle=True)'s, pass after pass
    (the attack harness replays them through `training_order`)."""
    loader = data.training_loader(range(size), 64, seed=3)
    plain = torch.utils.data.DataLoader(range(size), batch_size=64, shuffle=True,
                                        generator=torch.Generator().manual_seed(3))
    order = data.training_order(size, 64, seed=3)
    for _ in range(3):
        batches, reference = [b.tolist() for b in loader], [b.tolist() for b in plain]
        assert [len(b) for b in batches] == lengths == [len(b) for b in [next(order) for _ in lengths]]
        assert batches == reference[:len(batches)] and len(loader) == len(lengths)
        assert len(loader) == data.batches_per_pass(size, 64) and min(lengths) >= min(data.MIN_LAST_BATCH, size)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,measured", [(64, True), (8, False)])
def test_run_evaluates_with_batch_norm_statistics_of_the_final_weights(tmp_path, batch_size, measured):
    """After `run` on short epochs (digits at batch 64: 22 steps), the encoder's first batch norm
    holds the mean of its input over the whole training set under the final weights, not a
    running average of the last steps' batches (which, on a small set, lags the weights by
    epochs and broke evaluation at some seeds); at 180 steps an epoch (batch 8) the running
    statistics already describe the last epoch and are kept."""
    from edge_client.trainer import run
    from splitnet import encoder_file

    torch.set_num_threads(1)
    splits = data.load(data.DataSpec("digits"))
    path = tmp_path / "encoder.pt"
    run(EdgeConfig(epochs=1, max_steps=5, batch_size=batch_size, progress=False, save_encoder=str(path)),
        LocalCloud(), splits)
    encoder = encoder_file.read(path).split.encoder.eval()
    conv, norm = encoder[0][0], encoder[0][1]  # conv1: Conv2d, BatchNorm2d
    with torch.no_grad():
        out = conv(torch.stack([x for x, _ in splits.train]))
    close = torch.allclose(norm.running_mean, out.mean((0, 2, 3)), rtol=1e-2, atol=1e-3)  # summed in other orders
    assert close == measured
