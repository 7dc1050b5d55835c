"""The job checkpoint file format: written by the cloud server, read by a curious cloud's attacker.

One header line, `splitnet-checkpoint <format> sha256=<hex>`, then the `torch.save`
bytes of the state. The checksum is over those bytes, so a damaged or truncated file is
refused before anything is unpickled. It detects accidents, not an attacker who can
write to the folder (they can recompute it); what they can write is still only data,
since the state loads with `torch.load(weights_only=True)` and so can never run code.

The format is shared by the roles (`cloud_server.checkpoints` writes and resumes from it,
`attacks.runner.load_decoder` reads the decoder out of it, `edge_client.state` keeps the
edge's resumable state in it), so it lives here, with the atomic write both writers use.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import torch

FORMAT = 1
MAGIC = b"splitnet-checkpoint"
_HEADER = re.compile(rb"splitnet-checkpoint (\d+) sha256=([0-9a-f]{64})\n")
_MAX_HEADER = 128


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from; the message names the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path}: {reason}")
        self.path, self.reason = path, reason  # for a reader that names its file otherwise (an edge state)


def encode(state: dict) -> bytes:
    """The bytes of a checkpoint file holding `state`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return b"%s %d sha256=%s\n" % (MAGIC, FORMAT, hashlib.sha256(payload).hexdigest().encode()) + payload


def write(path: str | Path, state: dict) -> None:
    """Write `state` to `path` so that a kill at any moment leaves either the old file or the new
    one, whole: the bytes go to a temporary name and are fsynced, then renamed over `path`, and
    the folder is fsynced so that the rename itself survives a power cut."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(encode(state))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read(path: str | Path) -> dict:
    """The state in a checkpoint file, its header and checksum checked, loaded with
    weights_only=True; CheckpointError otherwise. Its contents are not checked (`check_state`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(path, f"cannot read it ({err.strerror or err})") from None
    if not data:
        raise CheckpointError(path, "the file is empty")
    header = _HEADER.match(data[:_MAX_HEADER])
    if header is None:
        raise CheckpointError(path, "not a split-learning checkpoint (no 'splitnet-checkpoint' header: another "
                                    "program's file, or one written before checkpoints had a format version)")
    if int(header[1]) != FORMAT:
        raise CheckpointError(path, f"format version {int(header[1])}; this program reads version {FORMAT}")
    payload = data[header.end():]
    if hashlib.sha256(payload).hexdigest().encode() != header[2]:
        raise CheckpointError(path, "checksum mismatch: the file is damaged or truncated")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only met something other than plain data
        raise CheckpointError(path, f"holds objects, not only weights; refused, as loading it could run code "
                                    f"({str(err).splitlines()[0]})") from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds on malformed archives
        raise CheckpointError(path, f"cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
