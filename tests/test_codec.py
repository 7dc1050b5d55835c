import math

import pytest
import torch

from splitnet import codec
from splitnet.v1 import split_pb2 as pb


@pytest.fixture
def features():
    torch.manual_seed(0)
    return torch.relu(torch.randn(8, 16, 4, 4))


@pytest.mark.parametrize("name,tol,itemsize", [("fp32", 0.0, 4), ("fp16", 1e-3, 2), ("bf16", 1e-2, 2),
                                               ("int8", None, 1)])
def test_round_trip_and_size(features, name, tol, itemsize):
    msg = codec.encode(features, name)
    assert len(msg.data) == features.numel() * itemsize
    out = codec.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert out.dtype == torch.float32 and out.shape == features.shape
    if tol is None:  # int8: error at most half a quantisation step
        step = float(features.max() - min(0.0, float(features.min()))) / 255
        assert (out - features).abs().max() <= step / 2 + 1e-6
    else:
        assert torch.allclose(out, features, rtol=tol, atol=tol)


def test_int8_keeps_zero_exact(features):
    out = codec.decode(codec.encode(features, "int8"))
    assert torch.equal(out[features == 0], torch.zeros_like(out[features == 0]))


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_int8_constant_tensor(value):
    t = torch.full((3, 5), value)
    out = codec.decode(codec.encode(t, "int8"))
    assert torch.allclose(out, t, atol=abs(value) / 255 + 1e-6)


def test_empty_tensor():
    t = torch.zeros(0, 4)
    assert codec.decode(codec.encode(t, "fp16")).shape == (0, 4)


def test_unknown_codec_names_flag():
    with pytest.raises(ValueError, match="grad_codec"):
        codec.check_codec("fp8", "grad_codec")


def test_length_mismatch_names_field(features):
    msg = codec.encode(features)
    msg.data = msg.data[:-4]
    with pytest.raises(codec.CodecError, match=r"features\.data"):
        codec.decode(msg, "features")


@pytest.mark.parametrize("mutate,field", [
    (lambda m: setattr(m, "dtype", 99), "features.dtype"),
    (lambda m: m.shape.__setitem__(0, -8), "features.shape"),
    (lambda m: m.shape.extend([1] * 9), "features.shape"),
])
def test_malformed_headers(features, mutate, field):
    msg = codec.encode(features)
    mutate(msg)
    with pytest.raises(codec.CodecError, match=field.replace(".", r"\.")):
        codec.decode(msg, "features")


@pytest.mark.parametrize("scale,zp,field", [(0.0, 0, "scale"), (math.nan, 0, "scale"), (1.0, 300, "zero_point")])
def test_int8_bad_quant_params(features, scale, zp, field):
    msg = codec.encode(features, "int8")
    msg.scale, msg.zero_point = scale, zp
    with pytest.raises(codec.CodecError, match=field):
        codec.decode(msg, "features")


KEPT = [1, 4, 5, 11]


@pytest.mark.parametrize("name,itemsize", [("fp32", 4), ("fp16", 2), ("bf16", 2), ("int8", 1)])
def test_only_the_channels_named_travel_and_the_rest_come_back_zero(features, name, itemsize):
    pruned = torch.zeros_like(features)
    pruned[:, KEPT] = features[:, KEPT]
    msg = codec.encode(pruned, name, channels=KEPT)
    assert list(msg.channels) == KEPT and list(msg.shape) == list(features.shape)
    assert len(msg.data) == features.numel() // features.shape[1] * len(KEPT) * itemsize
    out = codec.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert out.shape == features.shape
    assert torch.equal(out[:, [c for c in range(16) if c not in KEPT]], torch.zeros(8, 12, 4, 4))
    assert torch.allclose(out, codec.decode(codec.encode(pruned, name)), atol=1e-6)  # as if sent whole


@pytest.mark.parametrize("channels", [[3, 3], [5, 2], [16], [-1]])
def test_channels_that_are_not_increasing_indices_are_refused_by_name(features, channels):
    msg = codec.encode(features)
    msg.channels.extend(channels)
    with pytest.raises(codec.CodecError, match=r"features\.channels: must be strictly increasing indices"):
        codec.decode(msg, "features")


def test_a_receiver_refuses_channels_whose_bytes_do_not_fit(features):
    """A whole tensor with a channel list (or a pruned one read as whole, by a receiver older than
    the field) fails on its byte length, naming the channels."""
    msg = codec.encode(features)
    msg.channels.extend(KEPT)
    with pytest.raises(codec.CodecError, match=r"features\.data: 8192 bytes, but shape \[8, 16, 4, 4\] \(4 of its "
                                               r"channels\) of FLOAT32 needs 2048"):
        codec.decode(msg, "features")
