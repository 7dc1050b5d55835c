"""Faults: late servers, hung servers, lost replies, graceful shutdown, too many calls.

Kill -9 + restart with exactly-once is covered by test_resume.py. Servers here run
in-process around servicer subclasses that inject the fault."""

import dataclasses
import pickle
import queue
import re
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_server.config import ServerConfig
from cloud_server.local import LocalCloud
from cloud_server.server import CloudServer
from cloud_server.servicer import SplitLearningServicer
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import CloudError, RemoteCloud
from edge_client.trainer import run
from splitnet import checkpoint_file, wire
from splitnet.models import OptimSpec, SplitSpec, build
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import free_port, spec, step, wait_until


def _serve(servicer_cls=SplitLearningServicer, **kw) -> tuple[CloudServer, str]:
    server = CloudServer(ServerConfig(**{"port": 0, "grace_seconds": 1.0, **kw}), servicer_cls)
    return server, f"127.0.0.1:{server.start()}"


class _Stream:
    """A Train call driven one request at a time."""

    def __init__(self, stub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.call = stub.Train(iter(self._requests.get, None), timeout=60)

    def send(self, request: pb.TrainStep) -> None:
        self._requests.put(request)

    def reply(self) -> pb.TrainResult:
        return next(self.call)


def _edge(address: str, job: str, **kw) -> EdgeConfig:
    conn = {"deadline_s": 10.0, "reconnect_s": 30.0, **kw.pop("connection", {})}
    return EdgeConfig(connection=ConnectionConfig(server=address, **conn), job=job, epochs=1, progress=False, **kw)


def test_client_waits_for_a_server_started_late():
    """UNAVAILABLE while the server is not there yet is retried with backoff.

    The deadline stays loose: the same run evaluates the test set afterwards, and on a loaded
    machine a 0.3 s deadline a batch failed that evaluation (a hung server's deadlines: `_Hangs`)."""
    port = free_port()
    config = _edge(f"127.0.0.1:{port}", "late", max_steps=3, connection={"deadline_s": 5.0})
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run(config, RemoteCloud(config.connection))))
    worker.start()
    time.sleep(2.0)  # several deadlines pass: the client keeps trying
    assert worker.is_alive() and not result
    server, _ = _serve(port=port)
    try:
        worker.join(120)
        assert result["steps"] == 3 and result["last_step_id"] == 3
        assert server.servicer.jobs["late"].steps_applied == 3
    finally:
        server.stop()


class _Hangs(SplitLearningServicer):
    """Opens sessions, then never answers anything else until released."""

    release = threading.Event()

    def _hang(self, *_):
        self.release.wait(60)
        raise RuntimeError("released")

    Train = Infer = Stats = CloseSession = _hang


def test_every_client_call_has_a_deadline():
    server, address = _serve(_Hangs)
    cloud = RemoteCloud(ConnectionConfig(server=address, deadline_s=0.5, reconnect_s=1.0))
    try:
        cloud.open("hang", "c", build(SplitSpec()), OptimSpec(), "fp32", 0)

        def bounded(call, seconds: float):
            started = time.monotonic()
            call()
            assert time.monotonic() - started < seconds

        def stats():
            with pytest.raises(grpc.RpcError) as err:
                cloud.stats()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def infer():  # the error names the server and the time it was given
            with pytest.raises(CloudError, match=f"DEADLINE_EXCEEDED: the cloud server at {address} did not answer "
                                                 r"within 0.5 s \(--deadline 0.5 a batch\)"):
                list(cloud.infer([torch.rand(2, 32, 8, 8)], "fp32"))

        def train():  # the per-step watchdog fires, reconnects are tried for reconnect_s, then it gives up,
            # naming the server and how long it waited: from the step's collect to giving up, at least the window
            cloud.submit(1, torch.rand(2, 32, 8, 8), torch.tensor([0, 1]), "fp32")
            with pytest.raises(CloudError, match=f"DEADLINE_EXCEEDED: no answer from the cloud server at {address} "
                                                 r"for (\d+) s, past the reconnect window \(--reconnect-seconds 1\)"
                               ) as err:
                cloud.collect(1)
            assert 1 <= int(re.search(r"for (\d+) s", str(err.value)).group(1)) <= 8

        bounded(stats, 3)
        bounded(infer, 3)
        bounded(train, 8)
        bounded(cloud.close, 3)  # CloseSession times out too; close() logs it and returns
    finally:
        _Hangs.release.set()
        server.stop()


def test_an_open_mid_run_waits_the_reconnect_window_and_a_first_one_the_connect_window():
    """A virtual client's turn opens its session over a worker's channel that the server has answered
    before (`mid_run`): a server that does not answer then went away mid-run, and is waited for as a step
    would be (--reconnect-seconds), not as a wrong --server is (--connect-seconds)."""
    port = free_port()
    config = ConnectionConfig(server=f"127.0.0.1:{port}", deadline_s=1.0, connect_s=1.0, reconnect_s=30.0)
    started = time.monotonic()
    with pytest.raises(CloudError, match=rf"nothing answers at 127.0.0.1:{port}.*gave up after \d+ s "
                                         r"\(--connect-seconds 1\)"):
        RemoteCloud(config).open("mid-run", "c", build(SplitSpec()), OptimSpec(), "fp32", 0)
    assert time.monotonic() - started < 10
    servers: list = []
    later = threading.Timer(3.0, lambda: servers.append(_serve(port=port)[0]))  # back after the connect window
    cloud = RemoteCloud(config, mid_run=True)
    later.start()
    try:
        assert cloud.open("mid-run", "c", build(SplitSpec()), OptimSpec(), "fp32", 0) == 0 and servers
    finally:
        later.join()
        cloud.close()
        for server in servers:
            server.stop()


def test_the_ray_drivers_count_waits_for_a_server_away_after_it_answered():
    """split-ray's last count (Stats) comes after its clients have ended: a server away for a moment then
    (a restart, the cloud's link down) is waited for, for the reconnect window, instead of costing the
    report; the first count, before anything ran, is tried once (a wrong --server is reported at once)."""
    from deploy.sim.bookkeeping import ServerView  # imports Ray: here, not while pytest collects (tests/ray_cluster.py)

    port = free_port()
    connection = ConnectionConfig(server=f"127.0.0.1:{port}", deadline_s=2.0, reconnect_s=30.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError):
        ServerView(connection, "view").stats()
    assert time.monotonic() - started < 10
    server, _ = _serve(port=port)
    view, restarted = ServerView(connection, "view"), []
    later = threading.Timer(2.0, lambda: restarted.append(_serve(port=port)[0]))
    try:
        assert view.stats().steps_applied == 0
        server.stop()
        later.start()
        assert view.stats().steps_applied == 0  # the restarted server's answer
        assert restarted
    finally:
        later.join()
        for other in restarted:
            other.stop()
        view.close()


def test_a_cloud_error_crosses_processes_whole():
    """A Ray actor's exception reaches the driver pickled: its code and message arrive as they left."""
    error = pickle.loads(pickle.dumps(CloudError(grpc.StatusCode.UNAVAILABLE, "no answer from 10.0.0.5:50051")))
    assert (type(error), error.code, str(error)) == (CloudError, grpc.StatusCode.UNAVAILABLE,
                                                     "no answer from 10.0.0.5:50051")


class _LosesOneReply(SplitLearningServicer):
    """Applies step `lose` and then breaks the stream instead of answering: a lost response."""

    lose = 3

    def Train(self, request_iterator, context):
        for result in super().Train(request_iterator, context):
            if result.step_id == self.lose and not getattr(self, "lost", False):
                self.lost = True
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (injected)")
            yield result


def test_a_step_retried_after_a_lost_reply_gets_its_gradient_once():
    server, address = _serve(_LosesOneReply)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            sid = stub.OpenSession(spec("lost-raw"), timeout=10).session_id
            steps = [step(sid, i) for i in (1, 2, 3)]
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Train(iter(steps), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            session = stub.OpenSession(spec("lost-raw"), timeout=10)  # the reconnect
            assert session.last_step_id == 3  # applied, although its reply never came
            steps[2].session_id = session.session_id
            retry = list(stub.Train(iter([steps[2]]), timeout=10))[0]
            assert retry.duplicate and len(retry.grad.data) == 4 * 32 * 64 * 4
            assert server.servicer.jobs["lost-raw"].steps_applied == 3
    finally:
        server.stop()


@pytest.mark.parametrize("acknowledged", [True, False])
def test_a_close_with_its_acknowledgement_leaves_no_kept_reply(acknowledged):
    """What the server keeps of a client that closed its session is its counter, not its last
    gradient (virtual clients close one after every turn, thousands of them); an older edge's
    close, without the acknowledgement, leaves the reply for a re-send."""
    server, address = _serve()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            first = step(stub.OpenSession(spec("closed"), timeout=10).session_id, 1)
            assert not list(stub.Train(iter([first]), timeout=10))[0].duplicate
            stub.CloseSession(pb.CloseRequest(session_id=first.session_id, received_step_id=int(acknowledged)),
                              timeout=10)
            first.session_id = stub.OpenSession(spec("closed"), timeout=10).session_id
            again = list(stub.Train(iter([first]), timeout=10))[0]
            assert again.duplicate and again.HasField("grad") is not acknowledged
            assert server.servicer.jobs["closed"].steps_applied == 1
        # the edge's own close acknowledges every reply it received
        run(_edge(address, "edge-closed", max_steps=2, client_id="e"), RemoteCloud(_edge(address, "").connection))
        assert not server.servicer.jobs["edge-closed"].clients["e"].replies
    finally:
        server.stop()


@pytest.mark.parametrize("pipeline", [0, 2])
def test_training_through_a_lost_reply_applies_every_step_once(pipeline):
    server, address = _serve(_LosesOneReply)
    try:
        config = _edge(address, "lost", max_steps=8, client_id="edge", connection={"pipeline": pipeline})
        result = run(config, RemoteCloud(config.connection))
        job = server.servicer.jobs["lost"]
        assert result["reconnects"] >= 1 and result["steps"] == result["last_step_id"] == 8
        assert job.steps_applied == 8 and job.last_step("edge") == 8
        # The lost reply's cached gradient was fetched again: the encoder missed no update.
        assert result["duplicate_steps"] == 0
        if pipeline == 0:
            local = run(dataclasses.replace(config, job="lost-local"), LocalCloud())
            assert result["train_loss"] == pytest.approx(local["train_loss"], rel=1e-5)
            assert result["test_accuracy"] == local["test_accuracy"]
    finally:
        server.stop()


class _OlderThanFlush(SplitLearningServicer):
    """A server from before Flush: it answers UNIMPLEMENTED, as the generated base class does."""

    Flush = split_pb2_grpc.SplitLearningServicer.Flush


def test_an_edge_finishing_against_a_server_without_flush_says_what_is_durable(tmp_path):
    server, address = _serve(_OlderThanFlush, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    try:
        result = run(_edge(address, "old", max_steps=7), RemoteCloud(_edge(address, "old").connection))
        assert result["last_step_id"] == 7 and server.servicer.jobs["old"].steps_applied == 7
        assert not result["durable"] and result["durable_step_id"] == 5  # the last scheduled checkpoint
    finally:
        server.stop()


class _FlushFailsAfterTheFirst(SplitLearningServicer):
    """Confirms the first Flush (the edge's state at start), then answers every later one as a
    server whose checkpoint write failed does."""

    flushes = 0

    def Flush(self, request, context):
        type(self).flushes += 1
        if self.flushes > 1:
            context.abort(grpc.StatusCode.INTERNAL, "the checkpoint could not be written")
        return super().Flush(request, context)


def test_an_edge_writes_no_state_the_server_did_not_make_durable(tmp_path, caplog):
    """A state is the promise that the server holds its steps: where the Flush before it fails,
    the edge keeps its last state (a crash of both ends resumes from it) and trains on."""
    server, address = _serve(_FlushFailsAfterTheFirst, checkpoint_dir=str(tmp_path / "ckpt"))
    try:
        config = _edge(address, "unconfirmed", max_steps=6, client_id="e", state_dir=str(tmp_path / "state"),
                       state_every=2)
        result = run(config, RemoteCloud(config.connection))
        assert result["last_step_id"] == 6 and server.servicer.jobs["unconfirmed"].steps_applied == 6
        state = checkpoint_file.read(tmp_path / "state" / "edge-state.ckpt")
        assert state["trainer"]["step_id"] == 0  # the start's, the last one the server confirmed
        assert _FlushFailsAfterTheFirst.flushes > 3  # steps 2, 4, 6 and the end each tried again
        assert "no state at step 2, the one of step 0 stays" in caplog.text and address in caplog.text
    finally:
        server.stop()


class _SlowStepTwo(SplitLearningServicer):
    """Step 2 waits inside the servicer until the test lets it finish."""

    entered, release = threading.Event(), threading.Event()

    def _train_one(self, request, caller):
        if request.step_id == 2:
            self.entered.set()
            self.release.wait(30)
        return super()._train_one(request, caller)


def test_graceful_shutdown_drains_in_flight_steps(tmp_path):
    server, address = _serve(_SlowStepTwo, grace_seconds=20.0, checkpoint_dir=str(tmp_path))
    stopper = threading.Thread(target=server.stop)
    with grpc.insecure_channel(address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        sid = stub.OpenSession(spec("drain"), timeout=10).session_id
        stream = _Stream(stub)
        stream.send(step(sid, 1))
        assert stream.reply().step_id == 1
        stream.send(step(sid, 2))
        assert _SlowStepTwo.entered.wait(10)
        stopper.start()  # what SIGTERM does
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME),
                           timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:  # new work is turned away while the old drains
            stub.OpenSession(spec("drain", "late-comer"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        assert stopper.is_alive()

        _SlowStepTwo.release.set()
        reply = stream.reply()  # the in-flight step completes and is answered
        assert reply.step_id == 2 and not reply.duplicate and reply.HasField("grad")
        stream.send(step(sid, 3))  # the next one is refused, retryably; the edge replays it after the restart
        with pytest.raises(grpc.RpcError) as err:
            stream.reply()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stopper.join(30)
    assert not stopper.is_alive()
    state = checkpoint_file.read(next(tmp_path.glob("*.ckpt")))
    assert state["steps_applied"] == 2 and state["client_last_step"] == {"c": 2}


def test_calls_beyond_max_workers_are_refused_not_queued():
    server, address = _serve(max_workers=2)
    gates = [queue.Queue(), queue.Queue()]
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            calls = [stub.Train(iter(gate.get, None), timeout=30) for gate in gates]  # two idle streams
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:
                stub.Stats(pb.StatsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for gate, call in zip(gates, calls):
                gate.put(None)
                assert list(call) == []
            deadline = time.monotonic() + 10
            while True:  # the slots free up as the streams end
                try:
                    stub.Stats(pb.StatsRequest(), timeout=10)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
    finally:
        server.stop()


def test_an_idle_stream_is_ended_with_a_status_that_says_so():
    server, address = _serve(idle_timeout_s=1.0)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            sid = stub.OpenSession(spec("idle"), timeout=10).session_id
            for first in ([], [step(sid, 1)]):  # silent from the start, or silent after a step
                stream = _Stream(stub)
                for request in first:
                    stream.send(request)
                    assert stream.reply().step_id == request.step_id
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    stream.reply()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "--idle-timeout" in err.value.details()
                assert time.monotonic() - started < 5
            deadline = time.monotonic() + 5
            while server.servicer.streams.in_use:  # both slots are given back as the calls end
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        server.stop()


def test_an_edge_whose_stream_was_ended_as_idle_reconnects_and_goes_on():
    server, address = _serve(idle_timeout_s=0.5)
    cloud = RemoteCloud(ConnectionConfig(server=address, deadline_s=10, reconnect_s=10))
    try:
        cloud.open("idle-edge", "c", build(SplitSpec()), OptimSpec(), "fp32", 0)
        for step_id in (1, 2):
            cloud.submit(step_id, torch.rand(2, 32, 8, 8), torch.tensor([0, 1]), "fp32")
            assert cloud.collect(step_id).grad is not None
            time.sleep(1.5)  # the server ends the quiet stream meanwhile
        assert cloud.reconnects == 1 and server.servicer.jobs["idle-edge"].last_step("c") == 2
    finally:
        cloud.close()
        server.stop()


def _watchers() -> int:
    return sum(t.name == "idle-streams" for t in threading.enumerate())


def test_one_thread_watches_every_open_stream_for_idleness_and_ends_with_the_last():
    """Each stream's handler reads its own requests (a reader thread per stream cost a thread and a
    hand-off per message); one thread ends idle ones, and only while a stream is open."""
    server, address = _serve(idle_timeout_s=30.0)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            sid = stub.OpenSession(spec("watched"), timeout=10).session_id
            before = threading.active_count()
            streams = [_Stream(stub) for _ in range(3)]
            for i, stream in enumerate(streams):
                stream.send(step(sid, i + 1))
                assert stream.reply().step_id == i + 1
            assert _watchers() == 1
            # a stream's threads are gRPC's own (the client's sender, the server's worker) and no
            # more: the watcher is the one thread the three added besides (a reader each: 3 more)
            assert threading.active_count() - before <= 2 * len(streams) + 1
            for stream in streams:
                stream.send(None)
                with pytest.raises(StopIteration):
                    stream.reply()
            assert wait_until(lambda: _watchers() == 0, 10), "the watcher outlived the last stream by seconds"
    finally:
        server.stop()


def test_a_step_computing_longer_than_the_idle_timeout_is_not_idle(monkeypatch):
    """Idle is the handler waiting for a message, not the time between messages: a step that
    computes past --idle-timeout gets its reply, and the stream goes on."""
    server, address = _serve(idle_timeout_s=0.5)
    slow = server.servicer._train_one

    def train_one(request, caller):
        time.sleep(1.2)
        return slow(request, caller)

    monkeypatch.setattr(server.servicer, "_train_one", train_one)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            sid = stub.OpenSession(spec("slow-steps"), timeout=10).session_id
            stream = _Stream(stub)
            for step_id in (1, 2):
                stream.send(step(sid, step_id))
                assert stream.reply().step_id == step_id
    finally:
        server.stop()


def test_streams_beyond_max_streams_are_refused_and_leave_workers_for_other_calls():
    server, address = _serve(max_workers=4, max_streams=2)
    gates = [queue.Queue() for _ in range(3)]
    try:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            held = [stub.Train(iter(gate.get, None), timeout=30) for gate in gates[:2]]
            deadline = time.monotonic() + 10
            while server.servicer.streams.in_use < len(held):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as err:  # a third: refused at once, not queued
                next(stub.Train(iter(gates[2].get, None), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in err.value.details()
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            stub.OpenSession(spec("beside-two-streams"), timeout=5)
            assert server.servicer.streams.in_use == 2
    finally:
        for gate in gates:
            gate.put(None)
        server.stop()
