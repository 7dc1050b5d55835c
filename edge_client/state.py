"""The edge's state file: what a killed `edge-client` needs to carry on exactly where it stopped.

`edge-client --state-dir DIR` keeps one file, DIR/edge-state.ckpt, in the checkpoint format
of `splitnet.checkpoint_file` (header, sha256 of the payload, `torch.load(weights_only=True)`:
plain tensors, numbers, strings, lists and dicts, never code), written atomically (temporary
file, fsync, rename), so a kill mid-write leaves the previous state whole. It holds:

- `trainer`: `TrainerState` as a dict: the encoder and its optimizer (momentum, and CEM's
  parameters once they joined it), the step counters and step id, the history, the data
  position (the shuffling generator before the open pass and the batches taken from it),
  the obfuscation noise generator, the cloud counters, and the simulated attacker (weights and
  Adam state) and channel gate of attacker-aware training and pruning (`adversary`);
- `epoch`: the running tally of an epoch the state was written in (None between epochs);
- `torch_rng`: the global torch generator (GMM's k-means++ seeding and the slot surrogate draw from it);
- `cem`: the surrogate's weights and buffers (GMM fit, gates), whether it joined the optimizer,
  and the open epoch's per-step figures;
- `detect` (with `--detect`): the hijacking detector's generator, running sums, series and
  checks (`edge_client.detect.Detector.state`), so a resumed edge fakes the same batches and
  scores as one never interrupted;
- the U-shaped split's head travels in `trainer`'s encoder (as "head.*"), its label defense's
  generator as `label_rng`;
- `client_id`, under which the server numbers this client's steps, and `identity`: the
  settings the run must share with the one that wrote it (`identity`).

A state is written with no step in flight. The steps the server applied after it are not
acknowledged to it (`Cloud.hold_replies_after`), so it keeps their replies: the resumed edge
sends them again, the same batches with the same noise under the same ids, and gets the
kept gradients back as duplicates, hence the same weights as a run never interrupted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_client.config import DefenseConfig, EdgeConfig
from splitnet import checkpoint_file
from splitnet.checkpoint_file import CheckpointError
from splitnet.models import SplitModel

FILE_NAME = "edge-state.ckpt"
KIND = "edge-state"
_KEYS = ("identity", "client_id", "trainer", "epoch", "torch_rng", "cem")


class StateError(ValueError):
    """A state file that cannot be resumed from: damaged, not an edge's state, or another run's.
    The message names the file and the reason (edge-client exits 2 with it)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"edge state {path}: {reason}")


class StateMismatch(StateError):
    """A whole state, written by a run with other settings: carrying it on would train another model."""


def path_in(state_dir: str | Path) -> Path:
    return Path(state_dir) / FILE_NAME


def identity(config: EdgeConfig, split: SplitModel) -> dict:
    """The settings that decide the model and the data order, which a resumed run must share."""
    spec = split.spec
    return {"arch": spec.arch, "cut": spec.cut, "width": spec.width, "bottleneck": spec.bottleneck,
            "job": config.job, "seed": config.seed, "dataset": config.data.name,
            "image_size": config.data.image_size, "test_fraction": config.data.test_fraction,
            "split_seed": config.data.split_seed, "batch_size": config.batch_size, "epochs": config.epochs,
            "max_steps": config.max_steps, "epoch_steps": config.epoch_steps, "lr": config.lr,
            "lr_schedule": config.lr_schedule, "warmup_epochs": config.warmup_epochs, "momentum": config.momentum,
            "weight_decay": config.weight_decay, "augment": config.augment, "codec": config.codec,
            "grad_codec": config.grad_codec, "pipeline": config.connection.pipeline,
            **{f"defense.{key}": value for key, value in config.defense.as_dict().items()}}


def _default(name: str) -> object:
    """The value of a defense setting that a state's identity lacks: the setting came after the state
    was written, and that run ran with its default (None for any other name)."""
    field = DefenseConfig.__dataclass_fields__.get(name.removeprefix("defense."))
    return field.default if name.startswith("defense.") and field is not None else None


def write(path: str | Path, state: dict) -> None:
    """`state` holds _KEYS (built by `EdgeTrainer.save_state`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    checkpoint_file.write(path, {"kind": KIND, **state})


def read(path: str | Path, expected: dict, client_id: str) -> dict:
    """The state in `path`, checked to be whole, an edge's, and this run's: `expected` is this run's
    `identity`, `client_id` its --client-id ('' takes the state's). StateError otherwise."""
    try:
        state = checkpoint_file.read(path)
    except CheckpointError as err:
        raise StateError(path, err.reason) from None
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise StateError(path, "not an edge state (a cloud-server job checkpoint?)")
    missing = [key for key in _KEYS if key not in state]
    if missing or not isinstance(state["identity"], dict):
        raise StateError(path, f"lacks {missing or ['identity']}")
    saved = {**state["identity"], "client_id": state["client_id"]}
    for name, now in {**expected, "client_id": client_id or state["client_id"]}.items():
        was = saved.get(name, _default(name))
        if was != now:
            raise StateMismatch(path, f"written by a run with {name} {was!r}, this run has {now!r}")
    if not isinstance(state["torch_rng"], torch.Tensor):
        raise StateError(path, "'torch_rng' is not a tensor")
    return state
