"""The one bridge between torch tensors and protobuf `Tensor` messages.

Nobody else turns wire bytes into tensors. Decoding validates everything a peer
controls (dtype, shape, byte length, quantisation parameters) and raises `CodecError`
naming the offending field, so the server can answer INVALID_ARGUMENT instead of
crashing. Bytes are little-endian (every platform torch ships for).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from splitnet.settings import CODECS
from splitnet.v1 import split_pb2 as pb

_WIRE_DTYPE = {"fp32": pb.FLOAT32, "fp16": pb.FLOAT16, "bf16": pb.BFLOAT16, "int8": pb.INT8}
_TORCH_DTYPE = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16,
                pb.INT8: torch.int8}
MAX_DIMS = 8
MAX_DIM_SIZE = 2**31 - 1  # larger sides overflow torch's stride arithmetic even with zero elements


class CodecError(ValueError):
    """A wire tensor is malformed; the message names the field."""


def check_codec(name: str, flag: str = "codec") -> str:
    if name not in CODECS:
        raise ValueError(f"unknown {flag} {name!r}; choose one of {list(CODECS)}")
    return name


def encode(tensor: torch.Tensor, codec: str = "fp32", channels: Sequence[int] | None = None) -> pb.Tensor:
    """Serialise a float tensor with the named codec (int8: affine, per tensor). `channels`: only
    these indices along dimension 1 travel (strictly increasing); the receiver restores the others
    as zeros, so it is for tensors whose other channels are zero (pruned features)."""
    t = tensor.detach().to("cpu", torch.float32)
    msg = pb.Tensor(dtype=_WIRE_DTYPE[check_codec(codec)], shape=list(t.shape))
    if channels is not None:
        msg.channels.extend(channels)
        t = t.index_select(1, torch.tensor(list(channels), dtype=torch.long))
    t = t.contiguous()
    if codec == "int8":
        q, scale, zero_point = _quantize(t)
        msg.scale, msg.zero_point = scale, zero_point
        t = q
    elif codec != "fp32":
        t = t.to(_TORCH_DTYPE[msg.dtype])
    msg.data = _raw_bytes(t)
    return msg


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the same 16 bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Affine int8 with zero exactly representable (ReLU and pruned zeros stay zero)."""
    if t.numel() == 0:
        return t.to(torch.int8), 1.0, 0
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    # The wire holds the scale as a float32: a range of subnormals alone would round it to 0,
    # which decoding rightly refuses, so it is at least the smallest normal float32.
    scale = max((hi - lo) / 255.0, _FLOAT32_TINY) if hi > lo else 1.0
    zero_point = int(max(-128, min(127, round(-128 - lo / scale))))
    q = torch.clamp(torch.round(t / scale) + zero_point, -128, 127).to(torch.int8)
    return q, scale, zero_point


def dtype_name(wire_dtype: int) -> str:
    """A wire dtype as the proto names it (FLOAT32, ..., INT8): for records and messages people read."""
    return pb.DType.Name(wire_dtype)


def decode(msg: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Rebuild a float32 tensor, checking every peer-controlled value first."""
    dtype = _TORCH_DTYPE.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"{field}.dtype: unsupported value {msg.dtype}")
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS or any(not 0 <= d <= MAX_DIM_SIZE for d in shape):
        raise CodecError(f"{field}.shape: {shape} is not a valid shape (at most {MAX_DIMS} dims, "
                         f"each in [0, {MAX_DIM_SIZE}])")
    channels = list(msg.channels)
    sent = _sent_shape(shape, channels, field)
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(sent) * itemsize
    data = msg.data  # each read of a bytes field copies it out of the message: read once
    if len(data) != expected:
        kept = f" ({len(channels)} of its channels)" if channels else ""
        raise CodecError(f"{field}.data: {len(data)} bytes, but shape {shape}{kept} of "
                         f"{dtype_name(msg.dtype)} needs {expected}")
    if expected == 0:
        return torch.zeros(shape, dtype=torch.float32)
    raw = torch.frombuffer(bytearray(data), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    if dtype == torch.bfloat16:
        raw = raw.view(torch.bfloat16)
    t = raw.reshape(sent)
    if dtype == torch.int8:
        if not (math.isfinite(msg.scale) and msg.scale > 0):
            raise CodecError(f"{field}.scale: {msg.scale} must be finite and > 0 for INT8")
        if not -128 <= msg.zero_point <= 127:
            raise CodecError(f"{field}.zero_point: {msg.zero_point} outside [-128, 127]")
        t = (t.to(torch.float32) - msg.zero_point) * msg.scale
    t = t.to(torch.float32)
    if not channels:
        return t
    full = torch.zeros(shape, dtype=torch.float32)
    full[:, channels] = t
    return full


def _sent_shape(shape: list[int], channels: list[int], field: str) -> list[int]:
    """The shape of what `data` holds: `shape` with dimension 1 cut to the channels sent, which
    must be strictly increasing indices of it (checked before any size is computed from them)."""
    if not channels:
        return shape
    if len(shape) < 2 or any(not 0 <= c < shape[1] for c in channels) \
            or any(a >= b for a, b in zip(channels, channels[1:])):
        raise CodecError(f"{field}.channels: must be strictly increasing indices of dimension 1 of shape "
                         f"{shape}, got {channels[:8]}{' ...' if len(channels) > 8 else ''}")
    return [shape[0], len(channels), *shape[2:]]
