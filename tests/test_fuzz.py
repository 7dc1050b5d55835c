"""Fuzzing the codec and the servicer with hypothesis.

The codec must answer any bytes with a tensor or a CodecError. The servicer must answer
any message with a status from the expected set whose message names a field, keep
serving, and leave honest clients that train at the same time exactly where they would
have been without the fuzz. The bulk (over 10,000 messages) calls the servicer in-process,
without sockets; a smaller slice goes over gRPC to a real cloud-server process, with bytes
that do not parse. Budgets are bounded (max_examples) so the module stays under a minute
on two shared cores."""

import math
import re
import threading
import time

import grpc
import pytest
import torch
from google.protobuf import message
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_server.checkpoints import Checkpointer
from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from cloud_server.servicer import SplitLearningServicer
from deploy.processes import start_server
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


def _spec_mutations(valid: pb.SessionSpec):
    """Lists of one to three changes to a valid SessionSpec. Job names come from a small set
    (the fuzzer's job, a finished honest one, a few new ones) so accepted specs cannot fill
    the server with jobs."""
    def field(name, strategy):
        return st.tuples(st.just(name), strategy)

    one = st.one_of(
        field("job", st.sampled_from(["fuzz", "baseline"]) | st.text("ab", max_size=2)),
        field("client_id", st.sampled_from(["f", "g", "honest"]) | st.text(max_size=4)),
        field("arch", st.sampled_from(["cnn", "vgg11_bn", "resnet20"]) | st.text(max_size=10)),
        field("cut", st.sampled_from(["", "conv1", "block1", "block2", "layer1", "pool2"]) | st.text(max_size=6)),
        field("num_classes", st.integers(-2, 12) | st.sampled_from([100_001, 2**31 - 1, -(2**31)])),
        field("input_shape", st.lists(st.integers(-1, 40) | st.sampled_from([2**20, 2**31 - 1]), max_size=4)),
        field("feature_shape", shapes),
        field("bottleneck", st.integers(-1, 8) | st.sampled_from([4097, 2**31 - 1])),
        field("width", floats | st.sampled_from([0.25, 4.0])),
        field("lr", floats),
        field("momentum", floats),
        field("weight_decay", floats),
        field("grad_codec", st.sampled_from(codec.CODECS) | st.text(max_size=5)),
        field("seed", st.integers(0, 2**64 - 1)),
    )
    return st.lists(one, min_size=1, max_size=3)


def _fuzz_spec(job: str, client: str) -> pb.SessionSpec:
    return pb.SessionSpec(job=job, client_id=client, arch="cnn", cut="block2", num_classes=10, input_shape=[1, 16, 16],
                          feature_shape=list(FEATURES), lr=0.05, momentum=0.9, grad_codec="int8")


# -- the bulk: the servicer called in-process, no sockets

# A refusal names the field at fault: some field of the messages a peer sends.
FIELDS = sorted({f.name for m in (pb.SessionSpec, pb.TrainStep, pb.InferRequest, pb.Tensor)
                 for f in m.DESCRIPTOR.fields})
NAMES_A_FIELD = re.compile(rf"\b({'|'.join(FIELDS)})\b")
HONEST_STEPS = 12
BATCH = 8  # fuzzed messages per hypothesis example


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """What the servicer uses of a grpc.ServicerContext: a caller's token, a peer, abort and
    the end-of-call callbacks (run by `_call` once the call is over)."""

    def __init__(self, token: str) -> None:
        self._metadata = ((security.AUTH_METADATA_KEY, security.AUTH_SCHEME + token),)
        self.callbacks: list = []
        self.active = True

    def peer(self) -> str:
        return "in-process"

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self) -> dict:
        return {}

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return self.active

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details)


def _call(rpc, request, token: str):
    """One call of a servicer method as gRPC would make it: a unary reply, or a streamed one as a list."""
    context = _Context(token)
    try:
        reply = rpc(request, context)
        return reply if isinstance(reply, message.Message) else list(reply)
    finally:
        context.active = False
        for callback in context.callbacks:
            callback()


def _honest_run(servicer: SplitLearningServicer, job: str) -> tuple[list[bytes], list[bytes]]:
    """Open a job, train it HONEST_STEPS seeded steps and infer once: every reply's bytes and the
    decoder's final weights, buffers and optimizer state."""
    generator = torch.Generator().manual_seed(0)
    sid = _call(servicer.OpenSession, _fuzz_spec(job, "honest"), HONEST).session_id
    replies = []
    for step_id in range(1, HONEST_STEPS + 1):
        features = torch.rand(4, *FEATURES, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator).tolist()
        msg = pb.TrainStep(session_id=sid, step_id=step_id, features=codec.encode(features, "int8"), labels=labels)
        replies += [r.SerializeToString() for r in _call(servicer.Train, iter([msg]), HONEST)]
    features = torch.rand(3, *FEATURES, generator=generator)
    request = pb.InferRequest(session_id=sid, request_id=1, features=codec.encode(features))
    replies += [r.SerializeToString() for r in _call(servicer.Infer, iter([request]), HONEST)]
    decoder = servicer.jobs[job]
    tensors = [*decoder.decoder.state_dict().values(),
               *(v for state in decoder.optimizer.state.values() for v in state.values())]
    return replies, [t.contiguous().numpy().tobytes() for t in tensors]


@pytest.mark.slow
def test_servicer_in_process_survives_10000_fuzzed_messages_while_an_honest_client_trains():
    """Mutated sessions, steps and inference requests, and random bytes that parse, straight into
    the servicer's RPC methods. Every refusal is an expected status whose message names a
    field; nothing else escapes; honest runs made meanwhile (each its own job, interleaved
    with the fuzz) are byte-identical to one made before it."""
    servicer = SplitLearningServicer(Checkpointer(None, 50), token_identity=True)
    baseline = _honest_run(servicer, "baseline")
    own = _call(servicer.OpenSession, _fuzz_spec("fuzz", "f"), FUZZER).session_id
    valid = pb.TrainStep(session_id=own, step_id=1, features=codec.encode(torch.rand(2, *FEATURES), "int8"),
                         labels=[3, 7])
    codes: dict[str, int] = {}
    sent = [0]
    done, honest_runs, failures = threading.Event(), [], []

    def keep_training() -> None:  # a run every half second: one job each, so they must not fill --max-jobs
        try:
            while not done.wait(0.5):
                honest_runs.append(_honest_run(servicer, f"honest-{len(honest_runs)}"))
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            failures.append(err)

    def expect(rpc, request, messages: int = 1) -> None:
        sent[0] += messages
        try:
            _call(rpc, request, FUZZER)
            codes["OK"] = codes.get("OK", 0) + 1
        except _Aborted as err:
            assert err.code in EXPECTED, (err.code, err.details)
            assert NAMES_A_FIELD.search(err.details), err.details
            codes[err.code.name] = codes.get(err.code.name, 0) + 1

    def leaked() -> str:
        return next((sid for sid, s in list(servicer.sessions.items()) if s.client_id == "honest"), "")

    # Several messages an example: hypothesis's own work per example (its mutator, its
    # bookkeeping) is most of the cost of an example that holds one small message.
    @given(st.lists(st.tuples(_mutations(valid, [own, LEAKED, "", "0" * 32]),
                              st.sampled_from(["train", "infer", "valid first"])), min_size=BATCH, max_size=BATCH))
    @settings(FUZZ, max_examples=6000 // BATCH)
    def mutated_steps(batch):
        for changes, rpc in batch:
            msg = _mutated(valid, changes, leaked)
            if rpc == "infer":
                expect(servicer.Infer, iter([pb.InferRequest(session_id=msg.session_id, request_id=msg.step_id,
                                                             features=msg.features)]))
            else:
                before = [valid] if rpc == "valid first" else []
                expect(servicer.Train, iter([*before, msg]), 1 + len(before))

    @given(_spec_mutations(_fuzz_spec("fuzz", "f")))
    @settings(FUZZ, max_examples=1500)
    def mutated_specs(changes):
        msg = _fuzz_spec("fuzz", "f")
        for name, value in changes:
            msg.ClearField(name)
            if isinstance(value, list):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        expect(servicer.OpenSession, msg)

    @given(st.lists(st.binary(max_size=300) | tensors.map(
        lambda t: pb.TrainStep(session_id=own, step_id=1, features=t, labels=[1, 2]).SerializeToString()),
        min_size=BATCH, max_size=BATCH))
    @settings(FUZZ, max_examples=2000 // BATCH)
    def random_bytes(batch):
        for data in batch:
            try:
                msg = pb.TrainStep.FromString(data)
            except DecodeError:  # ParseRequests' job: see the process test and the one below
                continue
            expect(servicer.Train, iter([msg]))

    worker = threading.Thread(target=keep_training)
    worker.start()
    timings = {}
    try:
        for phase in (mutated_steps, mutated_specs, random_bytes):
            started = time.monotonic()
            phase()
            timings[phase.__name__] = round(time.monotonic() - started, 1)
    finally:
        done.set()
        worker.join(60)
    print(f"in-process fuzz: {sent[0]} messages, seconds {timings}, status codes {codes}; "
          f"honest runs alongside: {len(honest_runs)}")

    assert not failures and not worker.is_alive() and honest_runs
    assert sent[0] >= 10_000
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION"} <= codes.keys()
    for run_replies, run_state in honest_runs:
        assert run_replies == baseline[0] and run_state == baseline[1]
    assert servicer.streams.in_use == 0  # every stream slot was given back


def _mutated(valid: pb.TrainStep, changes, leaked) -> pb.TrainStep:
    msg = pb.TrainStep()
    msg.CopyFrom(valid)
    for change, value in changes:
        change(msg, value)
    if msg.session_id == LEAKED:
        msg.session_id = leaked()
    return msg


# -- a slice over the wire: a real cloud-server process


@pytest.mark.slow
def test_server_process_survives_fuzzing_while_an_honest_client_trains():
    """The same mutations through gRPC to a cloud-server process, plus bytes that do not parse.
    Honest runs repeat, one after another, for as long as the fuzz lasts; each must equal a
    run made before the fuzz began (same seed, its own job)."""
    proc = start_server("--auth-token", HONEST, "--auth-token", FUZZER, "--grace-seconds", "0.5")
    address = proc.address
    fuzzing, results, clouds = threading.Event(), [], []

    def honest(job: str) -> dict:
        config = EdgeConfig(connection=ConnectionConfig(server=address, auth_token=HONEST), job=job,
                            client_id="honest", epochs=1, max_steps=20, progress=False)
        clouds.append(RemoteCloud(config.connection))
        return run(config, clouds[-1])

    def keep_training() -> None:
        while fuzzing.is_set():
            results.append(honest(f"fuzzed-{len(results)}"))

    try:
        baseline = honest("baseline")
        channel = security.open_channel(address, [], auth_token=FUZZER)
        stub = split_pb2_grpc.SplitLearningStub(channel)
        raw_train = channel.stream_stream("/splitnet.v1.SplitLearning/Train")
        own = stub.OpenSession(_fuzz_spec("fuzz", "f"), timeout=10).session_id
        valid = pb.TrainStep(session_id=own, step_id=1, features=codec.encode(torch.rand(2, *FEATURES), "int8"),
                             labels=[3, 7])
        codes: dict[str, int] = {}

        def expect(call) -> None:
            try:
                call()
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as err:
                assert err.code() in EXPECTED, (err.code(), err.details())
                codes[err.code().name] = codes.get(err.code().name, 0) + 1

        @given(_mutations(valid, [own, LEAKED, "", "0" * 32]), st.sampled_from(["train", "infer", "valid first"]))
        @settings(FUZZ, max_examples=400)
        def mutated(changes, rpc):
            msg = _mutated(valid, changes, lambda: clouds[-1].session_id)
            if rpc == "infer":
                request = pb.InferRequest(session_id=msg.session_id, request_id=msg.step_id, features=msg.features)
                expect(lambda: list(stub.Infer(iter([request]), timeout=10)))
            else:
                before = [valid] if rpc == "valid first" else []
                expect(lambda: list(stub.Train(iter([*before, msg]), timeout=10)))

        @given(st.binary(max_size=300) | tensors.map(lambda t: pb.TrainStep(session_id=own, step_id=1, features=t,
                                                                              labels=[1, 2]).SerializeToString()))
        @settings(FUZZ, max_examples=200)
        def random_bytes(data):
            expect(lambda: list(raw_train(iter([data]), timeout=10)))

        fuzzing.set()
        worker = threading.Thread(target=keep_training)
        worker.start()
        mutated()
        random_bytes()
        fuzzing.clear()
        worker.join(120)
        print(f"process fuzz status codes: {codes}; honest runs alongside: {len(results)}")

        assert results and not worker.is_alive()
        for result in results:
            assert (result["train_loss"], result["test_accuracy"]) == (baseline["train_loss"],
                                                                       baseline["test_accuracy"])
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
        jobs = {j.job: j for j in stats.jobs}
        for i in range(len(results)):
            assert jobs[f"fuzzed-{i}"].steps_applied == 20 and jobs[f"fuzzed-{i}"].client_last_step["honest"] == 20
        assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"} <= codes.keys()
        assert stats.steps_rejected > 100
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        fuzzing.clear()
        assert proc.stop(timeout=20) == 0, proc.output()


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
