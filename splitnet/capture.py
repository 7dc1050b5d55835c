"""What an attacker recorded: a pickle-free capture folder, written by the proxy or the tap.

Layout of a capture folder `DIR`:

- `DIR/sessions.jsonl`: one JSON object per session seen: `session_id`, `source`
  ("proxy" | "tap") and the model the edge declared (`arch`, `cut`, `num_classes`,
  `input_shape`, `feature_shape`, `bottleneck`, `job`; `head_cut` for a U-shaped split).
- `DIR/records.jsonl`: one JSON object per intercepted message carrying features:
  `seq` (order of capture), `source`, `method` ("Train" | "Infer"; "TrainGrad" for the
  gradients a U-shaped edge sends up, dLoss/d(the middle's output), one row per example), `session_id`,
  `step_id` (the Train step id or the Infer request id), `wire_dtype` (as sent:
  FLOAT32, FLOAT16, BFLOAT16, INT8), `shape`, `labels` (Train only, else []),
  `file` and `time` (Unix seconds).
- `DIR/tensors/NNNNNNNN.npy`: the features as float32 (decoded by `splitnet.codec`
  exactly as the server decodes them), read back with `numpy.load(allow_pickle=False)`.

Nothing in the folder is pickled, so opening a capture from someone else cannot run code.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from splitnet import codec
from splitnet.models import SplitSpec


@dataclass(frozen=True)
class Record:
    seq: int
    source: str
    method: str
    session_id: str
    step_id: int
    wire_dtype: str
    shape: tuple[int, ...]
    labels: tuple[int, ...]
    file: str
    time: float


class CaptureWriter:
    """Append-only, thread-safe (gRPC handlers call it concurrently)."""

    def __init__(self, directory: str | Path, source: str) -> None:
        self.root = Path(directory)
        (self.root / "tensors").mkdir(parents=True, exist_ok=True)
        self.source = source
        self._lock = threading.Lock()
        self._seq = sum(1 for _ in open(self.root / "records.jsonl")) if (self.root / "records.jsonl").exists() else 0
        self._sessions: set[str] = {s["session_id"] for s in read_sessions(self.root)}

    def record_session(self, session_id: str, model: dict) -> None:
        with self._lock:
            if session_id in self._sessions:
                return
            self._sessions.add(session_id)
            _append(self.root / "sessions.jsonl", {"session_id": session_id, "source": self.source, **model})

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def record(self, method: str, session_id: str, step_id: int, features: torch.Tensor, wire_dtype: int,
               labels: list[int]) -> None:
        """Store one message's features, decoded as the server decodes them (`wire_dtype`: as sent)."""
        array = features.detach().cpu().float().numpy()
        with self._lock:
            seq = self._seq
            self._seq += 1
            name = f"tensors/{seq:08d}.npy"
            np.save(self.root / name, array, allow_pickle=False)
            _append(self.root / "records.jsonl", {
                "seq": seq, "source": self.source, "method": method, "session_id": session_id,
                "step_id": int(step_id), "wire_dtype": codec.dtype_name(wire_dtype), "shape": list(array.shape),
                "labels": list(labels), "file": name, "time": time.time()})


def session_model(spec: SplitSpec, feature_shape: Sequence[int], job: str) -> dict:
    """What `sessions.jsonl` holds of a session's model, the same from the proxy (as the edge declared
    it) and from the tap (the job's)."""
    return {"arch": spec.arch, "cut": spec.cut, "num_classes": spec.num_classes,
            "input_shape": list(spec.input_shape), "bottleneck": spec.bottleneck,
            "feature_shape": list(feature_shape), "job": job, **({"head_cut": spec.head_cut} if spec.head_cut else {})}


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_records(directory: str | Path) -> list[Record]:
    path = Path(directory) / "records.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no capture in {directory}: {path} is missing (run `attacker proxy --capture` "
                                "or `cloud-server --tap` first)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Record(**{**r, "shape": tuple(r["shape"]), "labels": tuple(r["labels"])}) for r in rows]


def read_sessions(directory: str | Path) -> list[dict]:
    path = Path(directory) / "sessions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def load_features(directory: str | Path, record: Record) -> torch.Tensor:
    return torch.from_numpy(np.load(Path(directory) / record.file, allow_pickle=False))
