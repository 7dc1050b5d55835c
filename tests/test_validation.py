"""Every bad input at the servicer boundary gets a status naming the field, leaves the
decoder byte-identical, is counted, and the server keeps serving everyone else.

The server runs in-process (a real gRPC server on 127.0.0.1, port 0) so the tests can
read the decoder's weights before and after a rejected request."""

import math
import uuid

import grpc
import pytest
import torch

from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from splitnet import codec
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import FEATURES, rejected, spec, step, tensor

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def cloud():
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5))
    port = server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, split_pb2_grpc.SplitLearningStub(channel)
    server.stop()


def decoder_bytes(server: CloudServer, job: str) -> list[bytes]:
    """Every weight, buffer and optimizer state of a job's decoder, as raw bytes."""
    j = server.servicer.jobs[job]
    tensors = list(j.decoder.state_dict().values())
    tensors += [v for s in j.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().cpu().contiguous().numpy().tobytes() for t in tensors]


def _mutated(field: str, value):
    """A valid step 2 with one field of the step or of its features replaced."""
    def make(sid: str) -> pb.TrainStep:
        msg = step(sid, 2)
        target = msg if field in ("session_id", "step_id", "labels") else msg.features
        if isinstance(value, list):
            target.ClearField(field)
            getattr(target, field).extend(value)
        else:
            setattr(target, field, value)
        return msg
    return make


def _replaced(features: pb.Tensor, labels: list[int] | None = None):
    return lambda sid: step(sid, 2, features, labels)


def _int8(scale: float, zero_point: int = 0) -> pb.Tensor:
    msg = tensor(name="int8")
    msg.scale, msg.zero_point = scale, zero_point
    return msg


BAD_STEPS = [
    ("unknown session", _mutated("session_id", "no-such-session"), NOT_FOUND, "session_id"),
    ("dtype unspecified", _mutated("dtype", pb.DTYPE_UNSPECIFIED), INVALID, "features.dtype"),
    ("dtype unknown", _mutated("dtype", 77), INVALID, "features.dtype"),
    ("data too short", _mutated("data", b"\0" * 100), INVALID, "features.data"),
    ("data of another dtype", _mutated("dtype", pb.FLOAT16), INVALID, "features.data"),
    ("shape of another cut", _mutated("shape", [4, 64, 4, 4]), INVALID, "features.shape"),
    ("shape without batch", _mutated("shape", list(FEATURES)), INVALID, "features.shape"),
    ("negative batch", _mutated("shape", [-4, *FEATURES]), INVALID, "features.shape"),
    ("empty batch", _replaced(tensor(batch=0), []), INVALID, "empty batch"),
    ("NaN", _replaced(tensor(fill=math.nan)), INVALID, "NaN"),
    ("Inf", _replaced(tensor(fill=-math.inf)), INVALID, "Inf"),
    ("int8 scale 0", _replaced(_int8(0.0)), INVALID, "features.scale"),
    ("int8 scale NaN", _replaced(_int8(math.nan)), INVALID, "features.scale"),
    ("int8 scale negative", _replaced(_int8(-1.0)), INVALID, "features.scale"),
    ("int8 zero point", _replaced(_int8(0.1, 300)), INVALID, "features.zero_point"),
    ("int8 overflow to Inf", _replaced(_int8(3e38, -128)), INVALID, "Inf"),
    ("finite features, non-finite loss", _replaced(tensor(fill=3e38)), INVALID, "step 2: the loss was not finite"),
    ("label too large", _mutated("labels", [0, 1, 2, 10]), INVALID, "labels"),
    ("label negative", _mutated("labels", [0, -1, 2, 3]), INVALID, "labels"),
    ("too few labels", _mutated("labels", [0, 1]), INVALID, "labels"),
    ("step id 0", _mutated("step_id", 0), INVALID, "step_id"),
    ("step id skips ahead", _mutated("step_id", 5), grpc.StatusCode.FAILED_PRECONDITION, "step_id"),
]


@pytest.mark.parametrize("make,code,text", [case[1:] for case in BAD_STEPS], ids=[case[0] for case in BAD_STEPS])
def test_bad_step_is_refused_and_changes_nothing(cloud, make, code, text):
    server, stub = cloud
    job = f"bad-{uuid.uuid4().hex[:8]}"
    sid = stub.OpenSession(spec(job), timeout=10).session_id
    other = stub.OpenSession(spec(job, client="bystander"), timeout=10).session_id
    assert not list(stub.Train(iter([step(sid, 1)]), timeout=10))[0].duplicate  # optimizer state now exists
    before, rejected_before = decoder_bytes(server, job), server.servicer.counters.steps_rejected

    err = rejected(lambda: list(stub.Train(iter([make(sid)]), timeout=10)))

    assert err.code() == code and text in err.details(), err.details()
    assert decoder_bytes(server, job) == before
    assert server.servicer.counters.steps_rejected == rejected_before + 1
    stats = stub.Stats(pb.StatsRequest(job=job), timeout=10).jobs[0]
    assert stats.steps_applied == 1 and dict(stats.client_last_step) == {"c": 1}
    # the same client goes on, and so does everyone else
    assert [r.step_id for r in stub.Train(iter([step(sid, 2)]), timeout=10)] == [2]
    assert [r.step_id for r in stub.Train(iter([step(other, 1)]), timeout=10)] == [1]


def test_a_poisoned_step_leaves_an_honest_client_of_the_job_unaffected(cloud):
    """Features of 3e38 are finite on the wire but overflow in the decoder: the step is refused
    before the optimizer moves, so an honest client sharing the job trains exactly as it does
    in a job nobody poisoned (same weights, buffers, optimizer state and losses)."""
    server, stub = cloud
    torch.manual_seed(1)
    batches = [tensor() for _ in range(4)]
    losses: dict[str, list[float]] = {}
    for job in ("poisoned", "clean"):
        sid = stub.OpenSession(spec(job, client="honest"), timeout=10).session_id
        losses[job] = [list(stub.Train(iter([step(sid, 1, batches[0])]), timeout=10))[0].loss]
        if job == "poisoned":
            evil = stub.OpenSession(spec(job, client="evil"), timeout=10).session_id
            before = decoder_bytes(server, job)
            err = rejected(lambda: list(stub.Train(iter([step(evil, 1, tensor(fill=3e38))]), timeout=10)))
            assert err.code() == INVALID and "not finite" in err.details() and "step 1" in err.details()
            assert decoder_bytes(server, job) == before
            assert server.servicer.jobs[job].last_step("evil") == 0  # the refused step did not count
        replies = list(stub.Train(iter([step(sid, i + 1, b) for i, b in enumerate(batches[1:], 1)]), timeout=10))
        losses[job] += [r.loss for r in replies]
    assert all(math.isfinite(x) for x in losses["poisoned"]) and losses["poisoned"] == losses["clean"]
    assert decoder_bytes(server, "poisoned") == decoder_bytes(server, "clean")


def test_non_finite_logits_are_refused(cloud):
    server, stub = cloud
    sid = stub.OpenSession(spec("infer-overflow"), timeout=10).session_id
    before = decoder_bytes(server, "infer-overflow")
    request = pb.InferRequest(session_id=sid, request_id=3, features=tensor(fill=3e38))
    err = rejected(lambda: list(stub.Infer(iter([request]), timeout=10)))
    assert err.code() == INVALID and "request 3" in err.details() and "logits were not finite" in err.details()
    assert decoder_bytes(server, "infer-overflow") == before


def test_repeated_and_old_step_ids_apply_once(cloud):
    server, stub = cloud
    sid = stub.OpenSession(spec("repeat"), timeout=10).session_id
    acknowledging = step(sid, 3)
    acknowledging.received_step_id = 2
    steps = [step(sid, 1), step(sid, 2), step(sid, 2), step(sid, 1), acknowledging, step(sid, 1)]
    replies = list(stub.Train(iter(steps), timeout=10))
    assert [(r.step_id, r.duplicate) for r in replies] == [(1, False), (2, False), (2, True), (1, True), (3, False),
                                                           (1, True)]
    # a retry gets its gradient again while the client has not acknowledged receiving it ...
    assert replies[2].grad == replies[1].grad and replies[3].grad == replies[0].grad
    assert not replies[5].HasField("grad")  # ... and nothing once it has: it has the gradient
    assert stub.Stats(pb.StatsRequest(job="repeat"), timeout=10).jobs[0].steps_applied == 3


def test_bad_infer_requests(cloud):
    server, stub = cloud
    sid = stub.OpenSession(spec("infer"), timeout=10).session_id
    before = decoder_bytes(server, "infer")
    cases = [("nope", tensor(), NOT_FOUND, "session_id"), (sid, tensor(fill=math.nan), INVALID, "NaN"),
             (sid, tensor(batch=0), INVALID, "empty batch"), (sid, codec.encode(torch.rand(2, 64, 4, 4)), INVALID,
                                                                  "features.shape"),
             (sid, _int8(0.0), INVALID, "features.scale")]
    for session_id, features, code, text in cases:
        err = rejected(lambda: list(stub.Infer(iter([pb.InferRequest(session_id=session_id, features=features)]),
                                               timeout=10)))
        assert err.code() == code and text in err.details(), err.details()
    assert decoder_bytes(server, "infer") == before
    reply = list(stub.Infer(iter([pb.InferRequest(session_id=sid, request_id=7, features=tensor(3))]), timeout=10))
    assert reply[0].request_id == 7 and list(reply[0].logits.shape) == [3, 10]


def test_closed_session_is_not_found_everywhere(cloud):
    _, stub = cloud
    sid = stub.OpenSession(spec("closed"), timeout=10).session_id
    list(stub.Train(iter([step(sid, 1)]), timeout=10))
    assert stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10).steps_applied == 1
    for call in (lambda: list(stub.Train(iter([step(sid, 2)]), timeout=10)),
                 lambda: list(stub.Infer(iter([pb.InferRequest(session_id=sid, features=tensor())]), timeout=10)),
                 lambda: stub.CloseSession(pb.CloseRequest(session_id=sid), timeout=10),
                 lambda: stub.Flush(pb.FlushRequest(session_id=sid), timeout=10)):
        err = rejected(call)
        assert err.code() == NOT_FOUND and "session_id" in err.details() and "closed" in err.details()
    # the client may open a new session and carry on from its step counter
    again = stub.OpenSession(spec("closed"), timeout=10)
    assert again.last_step_id == 1


def test_flush_without_a_checkpoint_folder_makes_nothing_durable(cloud):
    _, stub = cloud
    sid = stub.OpenSession(spec("flush"), timeout=10).session_id
    list(stub.Train(iter([step(sid, 1)]), timeout=10))
    assert stub.Flush(pb.FlushRequest(session_id=sid), timeout=10).durable_step_id == 0


def test_reopen_replaces_the_clients_previous_session(cloud):
    _, stub = cloud
    first = stub.OpenSession(spec("reopen"), timeout=10).session_id
    second = stub.OpenSession(spec("reopen"), timeout=10).session_id
    assert rejected(lambda: list(stub.Train(iter([step(first, 1)]), timeout=10))).code() == NOT_FOUND
    assert list(stub.Train(iter([step(second, 1)]), timeout=10))[0].step_id == 1
    assert stub.Stats(pb.StatsRequest(job="reopen"), timeout=10).jobs[0].sessions_open == 1


BAD_SPECS = [
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 10**6}, "num_classes"),
    ({"input_shape": [1, 16]}, "input_shape"),
    ({"input_shape": [3, 4096, 4096]}, "input_shape"),
    ({"input_shape": [1, 1, 1], "feature_shape": [32, 0, 0]}, "input_shape"),  # too small for the pooling
    ({"bottleneck": 10**6}, "bottleneck"),
    ({"lr": math.inf}, "lr"),
    ({"lr": 0.0}, "lr"),
    ({"momentum": -0.5}, "momentum"),
    ({"weight_decay": math.nan}, "weight_decay"),
    ({"grad_codec": "fp8"}, "grad_codec"),
    ({"arch": "x" * 1000}, "arch"),
    ({"client_id": ""}, "client_id"),
    ({"feature_shape": [16, 8, 8]}, "feature_shape"),
]


@pytest.mark.parametrize("kw,text", BAD_SPECS, ids=[t for _, t in BAD_SPECS])
def test_bad_session_spec_builds_nothing(cloud, kw, text):
    server, stub = cloud
    job = f"spec-{uuid.uuid4().hex[:8]}"
    err = rejected(lambda: stub.OpenSession(spec(job, **kw), timeout=30))
    assert err.code() == INVALID and text in err.details(), err.details()
    assert job not in server.servicer.jobs  # feature_shape: found once the job's model exists, which is then dropped


def test_size_and_job_limits_name_their_flags():
    server = CloudServer(ServerConfig(port=0, max_message_mb=0.05, max_jobs=2, grace_seconds=0.5))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 2**27)]) as ch:
            stub = split_pb2_grpc.SplitLearningStub(ch)
            sid = stub.OpenSession(spec("a"), timeout=10).session_id
            stub.OpenSession(spec("b"), timeout=10)
            err = rejected(lambda: stub.OpenSession(spec("c"), timeout=10))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-jobs" in err.details()
            stub.OpenSession(spec("a", client="d"), timeout=10)  # joining an existing job is fine
            for batch in (8, 1024):  # over our limit (64 KiB > 0.05 MiB), and over gRPC's own backstop (4x)
                err = rejected(lambda: list(stub.Train(iter([step(sid, 1, tensor(batch))]), timeout=30)))
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "cloud-server --max-message-mb" in rejected(
                lambda: list(stub.Infer(iter([pb.InferRequest(session_id=sid, features=tensor(8))]), timeout=10))
            ).details()
            assert list(stub.Train(iter([step(sid, 1, tensor(2))]), timeout=10))[0].step_id == 1
    finally:
        server.stop()
