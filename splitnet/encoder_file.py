"""The encoder file format: written by `edge-client --save-encoder`, read by `edge-client
--infer-only` (collaborative inference with the trained encoder) and by `attacker run
--encoder` (an attacker who unpacked the device).

A `torch.save` dict, loaded with `weights_only=True` (plain values and tensors, never code):
`spec` (`SplitSpec.as_dict`), `feature_shape`, `defense` (the edge's defense settings, from
which both readers rebuild the obfuscation applied before the wire), `encoder` (the state
dict) and, in files written since inference came, `job` (the training job, whose decoder
the cloud holds) and `codec` (the features' codec in training); a U-shaped split's also `head`
(the edge's head, which turns the cloud's answer into logits). Two roles read it, so it lives here.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from splitnet import models


@dataclass
class EncoderFile:
    split: models.SplitModel  # the encoder with its trained weights, in eval mode; the decoder is a fresh one
    defense: dict
    job: str = ""
    codec: str = ""

    @property
    def spec(self) -> models.SplitSpec:
        return self.split.spec


def write(path: str | Path, split: models.SplitModel, defense: dict, job: str, codec: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    def plain(module: torch.nn.Module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    head = {"head": plain(split.head)} if split.head is not None else {}
    torch.save({"spec": split.spec.as_dict(), "feature_shape": list(split.feature_shape), "defense": defense,
                "encoder": plain(split.encoder), "job": job, "codec": codec, **head}, path)


class DoesNotFit(ValueError):
    """An encoder file of another model than the one a run builds."""


def read_fitting(path: str | Path, spec: models.SplitSpec) -> EncoderFile:
    """The encoder file at `path`, refused (DoesNotFit, naming the file, the field and both values)
    unless it holds the model `spec` describes: a run that continues a trained encoder."""
    try:
        found = read(path)
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
        raise DoesNotFit(f"{path}: not an encoder file ({type(err).__name__}: {str(err).splitlines()[0][:200]})") \
            from None
    field = spec.differs(found.spec)
    if field:
        raise DoesNotFit(f"{path}: its {field[0]} is {field[2]!r}, this run's is {field[1]!r}")
    return found


def read(path: str | Path) -> EncoderFile:
    state = torch.load(path, map_location="cpu", weights_only=True)
    split = models.build(models.SplitSpec.from_dict(state["spec"]))
    split.encoder.load_state_dict(state["encoder"])
    split.encoder.eval()
    if split.head is not None:
        split.head.load_state_dict(state["head"])
        split.head.eval()
    return EncoderFile(split, state["defense"], state.get("job", ""), state.get("codec", ""))
