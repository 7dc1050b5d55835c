"""Fuzzing the codec and the servicer with hypothesis.

The codec must answer any bytes with a tensor or a CodecError. The servicer must answer
any message with a status from the expected set, keep serving, and leave an honest
client that trains at the same time exactly where it would have been without the fuzz.
Budgets are bounded (max_examples) so the module stays well under a minute."""

import math
import threading

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run
from splitnet import codec, security
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HONEST, FUZZER = "honest-token-0123456789", "fuzzer-token-0123456789"
FEATURES = (64, 4, 4)  # cnn cut block2: small messages, many examples
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}

floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, -1.0, 1e-45, 3e38, math.inf, math.nan]))
# Both the codec and the servicer get huge dims too (the codec bounds each side).
shapes = st.lists(st.integers(-3, 70) | st.sampled_from([2**31, 2**62, -(2**63)]), max_size=6)


def _tensors(shape_strategy) -> st.SearchStrategy[pb.Tensor]:
    return st.builds(pb.Tensor, dtype=st.integers(-2, 6), shape=shape_strategy, data=st.binary(max_size=600),
                     scale=floats, zero_point=st.integers(-(2**31), 2**31 - 1))


tensors = _tensors(shapes)


def _check_decode(msg: pb.Tensor) -> None:
    try:
        out = codec.decode(msg)
    except codec.CodecError:
        return
    assert out.dtype == torch.float32 and list(out.shape) == list(msg.shape)


@given(st.binary(max_size=400))
@settings(FUZZ, max_examples=1500)
def test_codec_survives_random_bytes(data):
    try:
        msg = pb.Tensor.FromString(data)
    except DecodeError:
        return
    _check_decode(msg)


@given(tensors)
@settings(FUZZ, max_examples=1500)
def test_codec_survives_random_tensors(msg):
    _check_decode(msg)


def test_int8_scale_of_subnormal_values_stays_a_valid_float32():
    """Found by fuzzing: the scale of a tensor of subnormals rounded to 0 on the wire, and the
    receiver refused the message its own peer had encoded."""
    values = torch.tensor([1.401298464324817e-45, 0.0])
    out = codec.decode(pb.Tensor.FromString(codec.encode(values, "int8").SerializeToString()))
    assert (out - values).abs().max() <= torch.finfo(torch.float32).tiny


def test_codec_refuses_zero_element_shapes_that_overflow():
    """Found by fuzzing: a zero-element shape with a huge side overflowed torch's strides (RuntimeError)."""
    with pytest.raises(codec.CodecError, match="shape"):
        codec.decode(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 2, 2**62]), "grad")


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(codec.CODECS), st.lists(st.integers(0, 5), min_size=1, max_size=4), st.data())
def test_codec_round_trips_what_it_encodes(name, shape, data):
    values = torch.tensor(data.draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=math.prod(shape),
                                             max_size=math.prod(shape))), dtype=torch.float32).reshape(shape)
    msg = codec.encode(values, name)
    out = codec.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert out.shape == values.shape and torch.isfinite(out).all()
    if name == "int8":  # affine quantisation: within half a step of the value
        error = (out - values).abs().max().item() if values.numel() else 0.0
        assert error <= msg.scale / 2 * (1 + 1e-5) + 1e-6
    else:  # rounding to the nearest representable value: half a unit in the last place
        rtol, atol = {"fp32": (0.0, 0.0), "fp16": (2 ** -11, 2 ** -24), "bf16": (2 ** -8, 1e-38)}[name]
        torch.testing.assert_close(out, values, rtol=rtol, atol=atol)


LEAKED = "<an honest client's session id>"


def _mutations(valid: pb.TrainStep, sessions: list[str]):
    """Lists of one to three changes that break fields of a valid step."""
    def dtype(m, v): m.features.dtype = v
    def shape(m, v): m.features.ClearField("shape"); m.features.shape.extend(v)
    def data(m, v): m.features.data = v
    def cut(m, v): m.features.data = m.features.data[:v]
    def scale(m, v): m.features.scale = v
    def zero_point(m, v): m.features.zero_point = v
    def labels(m, v): m.ClearField("labels"); m.labels.extend(v)
    def step_id(m, v): m.step_id = v
    def session_id(m, v): m.session_id = v
    def no_features(m, v): m.ClearField("features")

    one = st.one_of(
        st.tuples(st.just(dtype), st.integers(-1, 6)),
        st.tuples(st.just(shape), shapes | st.integers(-2, 5).map(lambda b: [b, *FEATURES])),
        st.tuples(st.just(data), st.binary(max_size=300)),
        st.tuples(st.just(cut), st.integers(0, len(valid.features.data))),
        st.tuples(st.just(scale), floats),
        st.tuples(st.just(zero_point), st.integers(-(2**31), 2**31 - 1)),
        st.tuples(st.just(labels), st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(-3, 12), max_size=6)),
        st.tuples(st.just(step_id), st.integers(0, 2**64 - 1) | st.integers(0, 50)),
        st.tuples(st.just(session_id), st.sampled_from(sessions) | st.text(max_size=40)),
        st.tuples(st.just(no_features), st.none()),
    )
    return st.lists(one, min_size=1, max_size=3)


def test_servicer_survives_fuzzing_while_an_honest_client_trains():
    """Honest runs repeat, one after another, for as long as the fuzz lasts; each must equal
    a run made before the fuzz began (same seed, its own job)."""
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5, auth_tokens=(HONEST, FUZZER)))
    address = f"127.0.0.1:{server.start()}"
    fuzzing, results = threading.Event(), []

    def honest(job: str) -> dict:
        config = EdgeConfig(connection=ConnectionConfig(server=address, auth_token=HONEST), job=job,
                            client_id="honest", epochs=1, max_steps=20, progress=False)
        return run(config, RemoteCloud(config.connection))

    def keep_training() -> None:
        while fuzzing.is_set():
            results.append(honest(f"fuzzed-{len(results)}"))

    try:
        baseline = honest("baseline")
        channel = security.open_channel(address, [], auth_token=FUZZER)
        stub = split_pb2_grpc.SplitLearningStub(channel)
        raw_train = channel.stream_stream("/splitnet.v1.SplitLearning/Train")
        own = stub.OpenSession(pb.SessionSpec(job="fuzz", client_id="f", arch="cnn", cut="block2", num_classes=10,
                                              input_shape=[1, 16, 16], feature_shape=list(FEATURES), lr=0.05,
                                              grad_codec="int8"), timeout=10).session_id
        valid = pb.TrainStep(session_id=own, step_id=1, features=codec.encode(torch.rand(2, *FEATURES), "int8"),
                             labels=[3, 7])
        codes: dict[str, int] = {}

        def leaked() -> str:
            return next((sid for sid, s in list(server.servicer.sessions.items()) if s.client_id == "honest"), "")

        def expect(call) -> None:
            try:
                call()
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as err:
                assert err.code() in EXPECTED, (err.code(), err.details())
                codes[err.code().name] = codes.get(err.code().name, 0) + 1

        @given(_mutations(valid, [own, LEAKED, "", "0" * 32]), st.sampled_from(["train", "infer", "valid first"]))
        @settings(FUZZ, max_examples=1200)
        def mutated(changes, rpc):
            msg = pb.TrainStep()
            msg.CopyFrom(valid)
            for change, value in changes:
                change(msg, value)
            if msg.session_id == LEAKED:
                msg.session_id = leaked()
            if rpc == "infer":
                request = pb.InferRequest(session_id=msg.session_id, request_id=msg.step_id, features=msg.features)
                expect(lambda: list(stub.Infer(iter([request]), timeout=10)))
            else:
                before = [valid] if rpc == "valid first" else []
                expect(lambda: list(stub.Train(iter([*before, msg]), timeout=10)))

        @given(st.binary(max_size=300) | tensors.map(lambda t: pb.TrainStep(session_id=own, step_id=1, features=t,
                                                                              labels=[1, 2]).SerializeToString()))
        @settings(FUZZ, max_examples=600)
        def random_bytes(data):
            expect(lambda: list(raw_train(iter([data]), timeout=10)))

        fuzzing.set()
        worker = threading.Thread(target=keep_training)
        worker.start()
        mutated()
        random_bytes()
        fuzzing.clear()
        worker.join(120)
        print(f"fuzz status codes: {codes}; honest runs alongside: {len(results)}")

        assert results and not worker.is_alive()
        for i, result in enumerate(results):
            assert (result["train_loss"], result["test_accuracy"]) == (baseline["train_loss"],
                                                                       baseline["test_accuracy"])
            job = server.servicer.jobs[f"fuzzed-{i}"]
            assert job.steps_applied == 20 and job.last_step("honest") == 20
        assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION"} <= codes.keys()
        assert server.servicer.counters.steps_rejected > 100
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        fuzzing.clear()
        _stops_promptly(server)


def _stops_promptly(server: CloudServer) -> None:
    stopper = threading.Thread(target=server.stop, daemon=True)  # daemon: a hang fails the test, not the run
    stopper.start()
    stopper.join(20)
    assert not stopper.is_alive(), "server.stop() hangs"


@pytest.mark.parametrize("method", ["Train", "Infer", "OpenSession"])
@pytest.mark.parametrize("junk", [b"\xff\xff", b"\x0a\x02\xc3\x28"])  # truncated; invalid UTF-8 in a string
def test_unparseable_requests_get_invalid_argument_and_shutdown_still_completes(method, junk):
    """Regression: grpcio's own parse failure on a streamed request made server.stop() hang forever."""
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5))
    address = f"127.0.0.1:{server.start()}"
    try:
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                if method == "OpenSession":
                    channel.unary_unary(f"/splitnet.v1.SplitLearning/{method}")(junk, timeout=10)
                else:
                    list(channel.stream_stream(f"/splitnet.v1.SplitLearning/{method}")(iter([junk]), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and method in err.value.details()
            split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(), timeout=10)
    finally:
        _stops_promptly(server)
