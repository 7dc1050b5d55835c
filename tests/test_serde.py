"""splitnet.serde: each message's two halves are one mapping, so a round trip gives the value back.

The full samples set every field of their message (a field the proto gains and serde forgets
fails here), with distinct values, so two fields swapped in a conversion fail too. Messages go
through bytes, as on the wire.
"""

from __future__ import annotations

import dataclasses
import re
import struct

import pytest
import torch

from splitnet import codec, serde
from splitnet.cloud_api import StepReply
from splitnet.models import OptimSpec, SplitSpec
from splitnet.schedule import LrSchedule
from splitnet.v1 import split_pb2 as pb

# Floats travel as float32: the samples hold values float32 represents exactly.
SCHEDULE = LrSchedule("multistep", (2, 5), 0.25, 0.5, 8, 7)
SPEC = serde.SessionSpec("job-a", "edge-1", SplitSpec("vgg11_bn", "pool2", 100, (3, 32, 32), 8, 0.5, "pool4"),
                         (8, 8, 8),
                         OptimSpec(0.125, 0.875, 0.0625, SCHEDULE), "int8", 2**64 - 1, "converged")
FEATURES = codec.encode(torch.linspace(-1, 1, 24).reshape(2, 3, 4), "int8")
GRAD = torch.tensor([[0.5, -1.25], [2.0, 0.0]])

SESSION = serde.Session("sid-1", 7, 40, True, True)
STEP = serde.TrainStep("sid-1", 3, FEATURES, [1, 0], 2, codec.encode(GRAD, "fp16"))
REPLY = StepReply(GRAD, 0.75, 2, True, 0.125, 3, 9, 1, -GRAD)
JOB = serde.JobStats("job-a", 8, 9, 10, {"edge-1": 11, "edge-2": 12})
STATS = serde.StatsReply(1, 2, 3, 4, 5, 6, 7, (JOB, serde.JobStats("job-b", 12)))

# message name -> (to_proto's arguments, what from_proto gives back)
FULL = {
    "LrSchedule": ((SCHEDULE,), SCHEDULE),
    "SessionSpec": ((SPEC,), SPEC),
    "Session": ((SESSION,), SESSION),
    "TrainStep": ((STEP,), STEP),
    "TrainResult": ((REPLY, "fp32"), REPLY),
    "InferRequest": ((serde.InferRequest("sid-1", 4, FEATURES),), serde.InferRequest("sid-1", 4, FEATURES)),
    "Prediction": ((serde.Prediction(4, GRAD),), serde.Prediction(4, GRAD)),
    "CloseRequest": ((serde.CloseRequest("sid-1", 6),), serde.CloseRequest("sid-1", 6)),
    "CloseReply": ((11,), 11),
    "FlushRequest": (("sid-1",), "sid-1"),
    "FlushReply": ((5,), 5),
    "StatsRequest": (("job-a",), "job-a"),
    "JobStats": ((JOB,), JOB),
    "StatsReply": ((STATS,), STATS),
}

def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def round_trip(name: str, *args):
    """The message `name`_to_proto makes of `args`, and what `name`_from_proto reads from its bytes."""
    msg = getattr(serde, f"{snake(name)}_to_proto")(*args)
    assert type(msg).__name__ == name
    return msg, getattr(serde, f"{snake(name)}_from_proto")(type(msg).FromString(msg.SerializeToString()))


def same(a, b) -> bool:
    """Equality that looks into dataclasses and compares tensors by dtype and value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def test_every_message_but_the_codecs_tensor_has_a_full_round_trip():
    assert set(FULL) == set(pb.DESCRIPTOR.message_types_by_name) - {"Tensor"}


@pytest.mark.parametrize("name", sorted(FULL))
def test_round_trip_gives_the_value_back(name):
    args, expected = FULL[name]
    msg, back = round_trip(name, *args)
    unset = [f.name for f in msg.DESCRIPTOR.fields if f not in {d for d, _ in msg.ListFields()}]
    assert not unset, f"the sample leaves {unset} of {name} unset: a conversion that forgot them would pass"
    assert same(back, expected), back


def test_the_check_tells_a_swapped_or_lost_field():
    assert not same(serde.CloseRequest("sid-1", 6), serde.CloseRequest("sid-1", 7))
    assert not same(StepReply(GRAD, 0.75, 2, True), StepReply(GRAD * 2, 0.75, 2, True))
    assert not same(StepReply(GRAD, 0.75, 2, True), StepReply(None, 0.75, 2, True))


# -- edge values


def test_an_older_edges_spec_reads_as_full_width_and_a_constant_rate():
    msg = serde.session_spec_to_proto(SPEC)
    msg.ClearField("width")
    msg.ClearField("lr_schedule")
    back = serde.session_spec_from_proto(msg)
    assert back.split.width == 1.0 and back.optim.schedule == LrSchedule()
    assert same(back, dataclasses.replace(SPEC, split=dataclasses.replace(SPEC.split, width=1.0),
                                          optim=dataclasses.replace(SPEC.optim, schedule=LrSchedule())))


def test_optional_fields_left_empty_come_back_empty():
    spec = dataclasses.replace(SPEC, seed=0, init_from_job="", split=SplitSpec(cut=""),
                               optim=OptimSpec(0.5, 0.0, 0.0, LrSchedule(gamma=0.5)))
    assert same(round_trip("SessionSpec", spec)[1], spec)
    assert round_trip("Session", serde.Session("sid-1"))[1] == serde.Session("sid-1", 0, 0, False, False)
    first_half = serde.TrainStep("", 1, FEATURES, [])  # a U-shaped step's first half: no gradient
    second_half = serde.TrainStep("", 1, None, [], output_grad=FEATURES)  # its second: no features
    assert same(round_trip("TrainStep", first_half)[1], first_half)
    assert same(round_trip("TrainStep", second_half)[1], second_half)
    assert round_trip("TrainResult", StepReply(GRAD, 0.5, 1, False), "fp32")[1].output is None
    empty = serde.TrainStep("", 1, codec.encode(torch.zeros(0, 3)), [])
    assert same(round_trip("TrainStep", empty)[1], empty)
    assert round_trip("CloseRequest", serde.CloseRequest("sid-1"))[1] == serde.CloseRequest("sid-1", 0)
    assert round_trip("StatsRequest", "")[1] == ""  # every job
    assert round_trip("StatsReply", serde.StatsReply())[1] == serde.StatsReply()
    assert round_trip("JobStats", serde.JobStats("job-a"))[1] == serde.JobStats("job-a", 0, 0, 0, {})


@pytest.mark.parametrize("schedule", [LrSchedule("cosine", (), 0.5, 1.5, 10, 4), LrSchedule(gamma=0.5, epochs=3),
                                      LrSchedule("multistep", tuple(range(1, 65)), 0.5, 0.0, 100, 2**40)],
                         ids=["cosine-warmup", "constant", "64-milestones"])
def test_each_kind_of_schedule_comes_back(schedule):
    assert round_trip("LrSchedule", schedule)[1] == schedule


def test_floats_come_back_as_their_float32_rounding():
    spec = dataclasses.replace(SPEC, optim=OptimSpec(0.05, 0.9, 5e-4, LrSchedule()))
    back = round_trip("SessionSpec", spec)[1].optim
    float32 = [struct.unpack("f", struct.pack("f", v))[0] for v in (0.05, 0.9, 5e-4, 0.1)]
    assert [back.lr, back.momentum, back.weight_decay, back.schedule.gamma] == float32 != [0.05, 0.9, 5e-4, 0.1]


def test_a_schedule_that_cannot_be_is_refused_naming_its_field():
    unsorted = pb.LrSchedule(kind="multistep", milestones=list(range(65, 0, -1)), gamma=0.5, epochs=100,
                             steps_per_epoch=1)
    with pytest.raises(ValueError, match=r"^lr_schedule\.milestones: at most 64$"):
        serde.lr_schedule_from_proto(unsorted)  # the length is refused before the order is looked at
    with pytest.raises(ValueError, match=r"^lr_schedule\.kind: 'zigzag'"):
        serde.lr_schedule_from_proto(pb.LrSchedule(kind="zigzag"))
    msg = serde.session_spec_to_proto(SPEC)
    msg.lr_schedule.gamma = 2.0
    with pytest.raises(ValueError, match=r"^lr_schedule\.gamma: 2.0"):
        serde.session_spec_from_proto(msg)


def test_a_spec_converts_unjudged_the_server_decides():
    back = serde.session_spec_from_proto(pb.SessionSpec(lr=-1.0, num_classes=1, input_shape=[0]))
    assert (back.job, back.optim.lr, back.split.num_classes, back.split.input_shape) == ("", -1.0, 1, (0,))


def test_a_duplicate_without_its_reply_has_no_gradient_and_an_empty_one_is_a_gradient():
    msg, back = round_trip("TrainResult", StepReply(None, 0.0, 0, True, step_id=3), "fp32")
    assert not msg.HasField("grad") and back.grad is None and back.duplicate
    msg, back = round_trip("TrainResult", StepReply(torch.zeros(0, 2), 0.5, 0, False, step_id=4), "fp32")
    assert msg.HasField("grad") and back.grad is not None and back.grad.shape == (0, 2)


def test_the_gradient_travels_in_the_sessions_codec():
    grad = torch.linspace(-3, 5, 40).reshape(4, 10)
    msg, back = round_trip("TrainResult", StepReply(grad, 0.5, 1, False, step_id=1), "int8")
    assert msg.grad.dtype == pb.INT8
    assert torch.equal(back.grad, codec.decode(codec.encode(grad, "int8"))) and not torch.equal(back.grad, grad)


def test_logits_travel_as_fp32():
    logits = torch.linspace(-3, 5, 40).reshape(4, 10) / 3  # not exact in fp16, bf16 or int8
    msg, back = round_trip("Prediction", serde.Prediction(1, logits))
    assert msg.logits.dtype == pb.FLOAT32 and torch.equal(back.logits, logits)


def test_a_request_converts_without_copying_what_the_peer_sent():
    """The server converts a TrainStep before its cheap checks, so converting must cost nothing of its size."""
    msg = pb.TrainStep(session_id="sid-1", step_id=1, features=FEATURES, labels=range(100_000))
    step = serde.train_step_from_proto(msg)
    msg.labels.append(7)
    msg.features.data = b"changed"
    assert len(step.labels) == 100_001 and step.features.data == b"changed"  # views of the message, not copies
    infer = pb.InferRequest(session_id="sid-1", features=FEATURES)
    request = serde.infer_request_from_proto(infer)
    infer.features.data = b"changed"
    assert request.features.data == b"changed"


def test_a_count_that_does_not_fit_its_field_is_refused():
    """The server leaves such a job out of its Stats reply, and relies on this to find it."""
    with pytest.raises(ValueError):
        serde.job_stats_to_proto(serde.JobStats("job-a", steps_applied=-1))
    with pytest.raises(ValueError):
        serde.job_stats_to_proto(serde.JobStats("job-a", client_last_step={"edge-1": 2**64}))
