"""The edge's connection to a cloud server: one session, a held Train stream, a held Infer stream.

Failure handling lives here so the trainer sees a plain `train(step_id, z, y)`:
- every step has a deadline (a watchdog cancels the stream call if it passes);
- UNAVAILABLE (server down, restarting) and deadlines are retried with exponential
  backoff for up to `reconnect_s`, re-opening the session with the same client id;
- steps the server has not yet made durable stay in a replay buffer; after a restart
  from a checkpoint the server reports its last applied step and the buffered steps
  after it are re-sent, so the decoder sees every step exactly once;
- steps whose reply never came are re-sent too, also those the server had applied: it
  keeps the replies this edge has not acknowledged (`received_step_id`), in its
  checkpoint as well, and answers with the gradient, so the encoder misses no update
  (an older server answers a duplicate without one, which the trainer counts);
- inference requests share one Infer stream held for the session (each reply within the
  deadline); one the server ended while idle is replaced unseen;
- `flush` at the end of training waits until the server has checkpointed the last step
  (replaying first if it restarted meanwhile), so a later crash loses nothing.

The channel (TLS, mutual TLS, bearer token on every call) comes from
`splitnet.security.open_channel`; UNAUTHENTICATED and PERMISSION_DENIED are not retried.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Iterable, Iterator, Sequence

import grpc
import torch

from edge_client.config import ConnectionConfig
from splitnet.models import OptimSpec, SplitModel
from splitnet import codec, security, serde, wire
from splitnet.cloud_api import NotDurable, StepReply
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

log = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_END = object()


class CloudError(RuntimeError):
    """The server refused or could not be reached; the message is for the user."""

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        """Pickled with both arguments: a Ray actor's error crosses to the driver pickled, and the default
        (the message alone) could not be rebuilt there, which left the driver Ray's "Failed to
        deserialize exception" instead of this message."""
        return type(self), (self.code, str(self))


class HeldStream:
    """A bidirectional call (Train or Infer) held open and driven one request at a time, so that a
    step or an inference request pays no call set-up: a new stream per request cost more than the
    round trip itself (README, "The floor under the split").

    One watchdog thread per stream enforces the per-reply deadline (re-armed each reply,
    not a new timer thread per reply): when a reply is late it cancels the call. It is woken
    only where a reply's deadline comes before the time it sleeps until: between replies it
    sleeps for one deadline's length at a time, so a reply's deadline, set after it fell
    asleep, is later than its waking, when it finds that deadline and sleeps until it. A
    stream of replies, each within its deadline, thus wakes it about once per deadline, not
    once per reply (a thread woken per reply took the GIL in the middle of every step).
    """

    def __init__(self, method: grpc.StreamStreamMultiCallable) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._call = method(iter(self._requests.get, _END))
        self._watch = threading.Condition()
        self._deadline: float | None = None
        self._deadline_s: float | None = None  # the last reply's allowance: the watchdog's sleep between replies
        self._wakes_at: float | None = None  # when the watchdog wakes by itself (None: only when notified)
        self._closed = self._timed_out = False
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        with self._watch:
            while not self._closed:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    self._timed_out, self._deadline = True, None
                    self._call.cancel()
                    continue
                if self._deadline is not None:
                    self._wakes_at = self._deadline
                else:
                    self._wakes_at = None if self._deadline_s is None else now + self._deadline_s
                self._watch.wait(None if self._wakes_at is None else self._wakes_at - now)

    def send(self, request) -> None:
        self._requests.put(request)

    def receive(self, deadline_s: float):
        with self._watch:
            self._deadline, self._deadline_s = time.monotonic() + deadline_s, deadline_s
            if self._wakes_at is None or self._wakes_at > self._deadline:
                self._watch.notify()
        try:
            return next(self._call)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and self._timed_out:
                raise _LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {deadline_s:g} s") from None
            raise
        finally:
            with self._watch:
                self._deadline = None

    def close(self) -> None:
        with self._watch:
            self._closed = True
            self._watch.notify()
        self._requests.put(_END)
        self._call.cancel()


class _LocalRpcError(grpc.RpcError):
    """A failure noticed on this side (deadline, no stream), shaped like gRPC's own errors."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


def open_channel(config: ConnectionConfig) -> grpc.Channel:
    """A channel to `config.server` with its TLS, token and message limits."""
    return security.open_channel(config.server, wire.grpc_options(config.max_message_mb), tls_ca=config.tls_ca,
                                 tls_cert=config.tls_cert, tls_key=config.tls_key,
                                 tls_server_name=config.tls_server_name, auth_token=config.auth_token)


class RemoteCloud:
    """The cloud as seen from the edge. Counts serialized bytes both ways and step RTTs."""

    def __init__(self, config: ConnectionConfig, channel: grpc.Channel | None = None, mid_run: bool = False) -> None:
        """`channel`: one of the caller's (made by `open_channel`), left open by `close`: a Ray worker
        runs the turns of many virtual clients, each a RemoteCloud of its own, over one connection.
        `mid_run`: the server has answered the caller before (an earlier turn of the worker), so one that
        does not answer `open` went away mid-run: it is waited for --reconnect-seconds, not --connect-seconds."""
        self.config = config
        self.mid_run = mid_run
        self._own_channel = channel is None
        self._channel = channel or open_channel(config)
        self._stub = split_pb2_grpc.SplitLearningStub(self._channel)
        self._spec: serde.SessionSpec | None = None
        self._stream: HeldStream | None = None
        self._infer_stream: HeldStream | None = None  # opened by the first `infer`, held until `close`
        self._infer_lock = threading.Lock()  # one `infer` at a time drives the Infer stream
        self._unacked: OrderedDict[int, serde.TrainStep] = OrderedDict()  # sent, not yet durable on the server
        self._in_flight: dict[int, tuple[float, int]] = {}  # sent, reply not yet received: when, and its bytes
        self._received = 0  # the highest step id whose reply came: acknowledged in every TrainStep
        self._held_after: int | None = None  # acknowledge no step after this one (`hold_replies_after`)
        self.durable_step_id = 0  # the last step id the server said a checkpoint holds
        self.session: serde.Session | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.rtt_ms: list[float] = []
        self.reconnects = 0
        self.replayed_steps = 0
        self.session_ids: list[str] = []  # every session this connection opened: a reconnect opens a new one

    # -- session

    @property
    def session_id(self) -> str:
        return self.session.session_id if self.session else ""

    def _open_session(self, wait_for_ready: bool) -> tuple[int, int]:
        """Open a session for `self._spec`; return the bytes sent and received."""
        request = serde.session_spec_to_proto(self._spec)  # type: ignore[arg-type]
        reply = self._stub.OpenSession(request, timeout=self.config.deadline_s, wait_for_ready=wait_for_ready)
        self.session = serde.session_from_proto(reply)
        self.session_ids.append(self.session.session_id)
        if self.session.u_shaped != self._spec.split.u_shaped:  # type: ignore[union-attr]
            raise CloudError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the cloud server at {self.config.server} does not run the U-shaped split (an older "
                             "cloud-server?): upgrade it, or train with --mode vanilla")
        return request.ByteSize(), reply.ByteSize()

    def open(self, job: str, client_id: str, split: SplitModel, optim: OptimSpec, grad_codec: str, seed: int,
             init_job: str = "") -> int:
        """Open (or re-join) the session; return the last step id the server applied for this client."""
        self._spec = serde.SessionSpec(job, client_id, split.spec, tuple(split.feature_shape), optim, grad_codec,
                                       seed, init_job)
        # wait_for_ready=False: a try fails at once with gRPC's reason (refused, closed, TLS
        # handshake), which `_unreachable` turns into advice; _with_retry still waits for a
        # server that comes up late, for --connect-seconds (not --reconnect-seconds: a wrong
        # address should not cost a minute before the user hears of it), or mid-run for
        # --reconnect-seconds, as a step would.
        self._count(*self._with_retry(lambda: self._open_session(wait_for_ready=False), "OpenSession",
                                      *(("reconnect_s", "--reconnect-seconds") if self.mid_run else ())))
        return self.session.last_step_id  # type: ignore[union-attr]

    def close(self) -> None:
        if self._stream:
            self._stream.close()
        with self._infer_lock:
            if self._infer_stream:
                self._infer_stream.close()
                self._infer_stream = None
        if self.session:
            try:  # with the acknowledgement: the server need keep no reply for this client now
                request = serde.CloseRequest(self.session.session_id, self._acknowledged)
                self._stub.CloseSession(serde.close_request_to_proto(request), timeout=self.config.deadline_s)
            except grpc.RpcError as err:
                log.warning("CloseSession failed: %s", err.details() if hasattr(err, "details") else err)
        if self._own_channel:
            self._channel.close()

    def stats(self) -> serde.StatsReply:
        request = serde.stats_request_to_proto(self._spec.job if self._spec else "")
        return serde.stats_reply_from_proto(self._stub.Stats(request, timeout=self.config.deadline_s))

    # -- training

    def hold_replies_after(self, step_id: int) -> None:
        self._held_after = step_id

    @property
    def _acknowledged(self) -> int:
        """The step id acknowledged to the server: the last reply received, but none after a held step."""
        return self._received if self._held_after is None else min(self._received, self._held_after)

    def submit(self, step_id: int, features: torch.Tensor, labels: torch.Tensor, codec_name: str,
               channels: Sequence[int] | None = None) -> None:
        """Send a step without waiting; `collect` gets its reply (replies come in order)."""
        step = serde.TrainStep("", step_id, codec.encode(features, codec_name, channels), labels.tolist())
        request = self._addressed(step)
        self._check_size(request)
        self._unacked[step_id] = step
        self._send(step_id, request)  # only queued: a broken stream shows in collect(), which reconnects and re-sends

    def forward(self, step_id: int, features: torch.Tensor, codec_name: str,
                channels: Sequence[int] | None = None) -> StepReply:
        """A U-shaped step's first half. The step is buffered for replay as the features alone until
        `backward` adds the output's gradient: a reconnect then re-sends both in one message."""
        self.submit(step_id, features, torch.empty(0, dtype=torch.long), codec_name, channels)
        return self.collect(step_id)

    def backward(self, step_id: int, output_grad: torch.Tensor, codec_name: str) -> StepReply:
        step = replace(self._unacked[step_id], output_grad=codec.encode(output_grad, codec_name))
        self._unacked[step_id] = step
        request = self._addressed(replace(step, features=None))  # the server holds them from the first half
        self._check_size(request)
        self._send(step_id, request)
        return self.collect(step_id)

    def collect(self, step_id: int) -> StepReply:
        deadline = time.monotonic() + self.config.reconnect_s
        while True:
            try:
                return self._receive(step_id)
            except grpc.RpcError as err:
                if err.code() not in _RETRYABLE:
                    raise _cloud_error(err, "Train") from None
                if time.monotonic() > deadline:
                    raise self._gave_up(err, "Train", deadline) from None
                log.warning("Train step %d: %s; reconnecting", step_id, err.details())
                self._reconnect(deadline)

    def flush(self, strict: bool = False) -> int:
        """Ask the server to checkpoint this client's last step and return the last durable step
        id. If the server restarted meanwhile, reconnect first and wait until the replayed steps
        are applied. A server older than Flush (UNIMPLEMENTED) gets a warning and the last durable
        step id its replies reported; so does one that fails to write or to answer in time, or
        NotDurable where `strict` (an edge state must not get ahead of the server's checkpoint)."""
        deadline = time.monotonic() + self.config.reconnect_s
        while True:
            try:
                reply = self._stub.Flush(serde.flush_request_to_proto(self.session_id), timeout=self.config.deadline_s)
                self.durable_step_id = serde.flush_reply_from_proto(reply)
                return self.durable_step_id
            except grpc.RpcError as err:  # NOT_FOUND: a restarted server does not know the session
                if err.code() not in {*_RETRYABLE, grpc.StatusCode.NOT_FOUND} or time.monotonic() > deadline:
                    what = (f"Flush on {self.config.server}: {err.code().name}: {err.details()}; the server's last "
                            f"reply said its checkpoint holds steps up to {self.durable_step_id}")
                    if strict and err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise NotDurable(what) from None
                    log.warning("%s", what)
                    return self.durable_step_id
            self._replay(deadline)

    def _replay(self, deadline: float) -> None:
        """Reconnect and wait for the replies to the steps re-sent (nobody else collects them)."""
        while True:
            try:
                resent = self._reconnect(deadline)
                if resent:
                    self._receive(resent[-1])
                return
            except grpc.RpcError as err:
                if err.code() not in _RETRYABLE:
                    raise _cloud_error(err, "Flush") from None
                if time.monotonic() > deadline:
                    raise self._gave_up(err, "Flush", deadline) from None

    def _addressed(self, step: serde.TrainStep) -> pb.TrainStep:
        """The step as sent now: to the session open now, acknowledging the replies received by now."""
        return serde.train_step_to_proto(replace(step, session_id=self.session.session_id,  # type: ignore[union-attr]
                                                 received_step_id=self._acknowledged))

    def _send(self, step_id: int, request: pb.TrainStep) -> None:
        if self._stream is None:
            self._stream = HeldStream(self._stub.Train)
        self._in_flight[step_id] = (time.perf_counter(), request.ByteSize())
        self._stream.send(request)

    def _receive(self, step_id: int) -> StepReply:
        """The reply for `step_id`, skipping replies to steps re-sent only for the server's sake."""
        while True:
            if self._stream is None:
                raise _LocalRpcError(grpc.StatusCode.UNAVAILABLE, "the Train stream is closed")
            result = self._stream.receive(self.config.deadline_s)
            reply = serde.train_result_from_proto(result)
            sent_at, sent_bytes = self._in_flight.pop(reply.step_id, (None, 0))
            self._count(sent_bytes, result.ByteSize())
            if not _first_half(reply):  # a U-shaped step is received when it is applied, at its second half
                self._received = max(self._received, reply.step_id)
            self.durable_step_id = reply.durable_step_id
            for old in [s for s in self._unacked if s <= reply.durable_step_id]:
                del self._unacked[old]
            if reply.step_id < step_id:  # a replay after a restart: its gradient was applied before
                continue
            if sent_at is not None:
                self.rtt_ms.append((time.perf_counter() - sent_at) * 1e3)
            return reply

    def _reconnect(self, deadline: float) -> list[int]:
        """Re-open the session and re-send, in order, every buffered step the server lacks and
        every step whose reply has not come; return their ids."""
        if self._stream:
            self._stream.close()
            self._stream = None
        backoff = 0.2
        while True:
            time.sleep(backoff)
            try:
                self._open_session(wait_for_ready=True)
                self.reconnects += 1
                last = self.session.last_step_id
                # A step in flight that the server had applied is re-sent to fetch its kept reply.
                # In flight means not received, so it is after every acknowledged step, hence kept.
                pending = [s for s in self._unacked if s > last or s in self._in_flight]
                after = [s for s in pending if s > last]
                lost = list(range(last + 1, after[0] if after else last + 1))
                if lost:
                    raise CloudError(grpc.StatusCode.DATA_LOSS,
                                     f"the server restarted without steps {lost[0]}..{lost[-1]} and they are no "
                                     "longer buffered here (was its --checkpoint-dir changed?)")
                for step_id in pending:
                    self._send(step_id, self._addressed(self._unacked[step_id]))
                self.replayed_steps += len(pending)
                return pending
            except grpc.RpcError as err:
                if err.code() not in _RETRYABLE:
                    raise _cloud_error(err, "reconnect") from None
                if time.monotonic() > deadline:
                    raise self._gave_up(err, "reconnect", deadline) from None
                if self._stream:
                    self._stream.close()
                    self._stream = None
                backoff = min(backoff * 2, 5.0)

    # -- inference

    def infer(self, batches: Iterable[torch.Tensor], codec_name: str,
              channels: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Send feature batches over the session's held Infer stream; return their logits in order.

        Every batch is encoded and size-checked before any is sent. Callers in several threads take
        turns on the stream (a lock held while one call's replies come back; the server answers a
        stream in order anyway). Each reply must come within the deadline (--deadline a batch)."""
        session_id = self.session.session_id  # type: ignore[union-attr]
        encoded = [codec.encode(features, codec_name, channels) for features in batches]
        with self._infer_lock:
            requests = []
            for i, features in enumerate(encoded):  # ids from 0 a call: the attack harness places request i of
                # an evaluation as its i-th batch of test images (attacks/harness.py)
                request = serde.infer_request_to_proto(serde.InferRequest(session_id, i, features))
                self._check_size(request)
                requests.append(request)
            try:
                return iter(self._exchange(requests))
            except BaseException as err:  # a stream with replies left unread would answer the next call with them
                if self._infer_stream:
                    self._infer_stream.close()
                    self._infer_stream = None
                if not isinstance(err, grpc.RpcError):
                    raise
                advice = ""  # a refusal speaks for itself; an unreachable server is named, with the time given
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    advice = self._unreachable(err)
                elif err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    advice = (f"the cloud server at {self.config.server} did not answer within "
                              f"{self.config.deadline_s:g} s (--deadline {self.config.deadline_s:g} a batch)")
                raise _cloud_error(err, "Infer", advice) from None

    def _exchange(self, requests: list[pb.InferRequest]) -> list[torch.Tensor]:
        """Send `requests` on the held Infer stream and read their replies (under `_infer_lock`).

        A stream held from an earlier call may have been ended by the server meanwhile (its
        --idle-timeout, a restart): one that fails UNAVAILABLE before answering anything of this
        call is replaced and the requests sent again, once (answering a request changes nothing on
        the server, so repeating one is safe); a server that is gone fails the new stream too."""
        reused = self._infer_stream is not None
        while True:
            if self._infer_stream is None:
                self._infer_stream = HeldStream(self._stub.Infer)
            for request in requests:
                self._infer_stream.send(request)
            logits = []
            try:
                for request in requests:
                    reply = self._infer_stream.receive(self.config.deadline_s)
                    self._count(request.ByteSize(), reply.ByteSize())
                    logits.append(serde.prediction_from_proto(reply).logits)
                return logits
            except grpc.RpcError as err:
                if not (reused and not logits and err.code() == grpc.StatusCode.UNAVAILABLE):
                    raise
                log.debug("the held Infer stream had ended (%s); opening a new one", err.details())
                self._infer_stream.close()
                self._infer_stream = None
                reused = False

    # -- helpers

    def _with_retry(self, call, what: str, window: str = "connect_s", flag: str = "--connect-seconds"):
        """`call`, tried again while the server is unreachable, for the config's `window` seconds (`flag`)."""
        seconds = getattr(self.config, window)
        start = time.monotonic()
        deadline = start + seconds
        backoff = 0.2
        warned = False
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                if err.code() not in _RETRYABLE:
                    raise _cloud_error(err, what) from None
                if time.monotonic() > deadline:
                    waited = time.monotonic() - start
                    raise _cloud_error(err, what, f"{self._unreachable(err)}; gave up after {waited:.0f} s "
                                                  f"({flag} {seconds:g})") from None
                if not warned:
                    log.warning("%s; retrying for %g s (%s)", self._unreachable(err), seconds, flag)
                    warned = True
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _gave_up(self, err: grpc.RpcError, what: str, deadline: float) -> CloudError:
        """The reconnect window (which ends at `deadline`) has run out: an error that says which server
        did not answer, and for how long."""
        waited = time.monotonic() - (deadline - self.config.reconnect_s)
        return _cloud_error(err, what, f"no answer from the cloud server at {self.config.server} for {waited:.0f} s, "
                                       f"past the reconnect window (--reconnect-seconds {self.config.reconnect_s:g})")

    def _unreachable(self, err: grpc.RpcError) -> str:
        """What to check when `--server` does not answer, from gRPC's reason."""
        server, details = self.config.server, (err.details() or "").lower()
        tls = bool(self.config.tls_ca or self.config.tls_cert or self.config.tls_key)
        if "handshake" in details or "ssl" in details:
            return (f"the TLS handshake with {server} failed: does it serve TLS (cloud-server --tls-cert), and did "
                    "--tls-ca sign its certificate?")
        if not tls and "socket closed" in details:
            return f"{server} closed the connection: if it serves TLS, connect with --tls-ca"
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{server} did not answer within {self.config.deadline_s:g} s (--deadline)"
        return f"nothing answers at {server}: is a cloud-server running there?"

    def _check_size(self, request) -> None:
        message = wire.too_large(type(request).__name__, request.ByteSize(), self.config.max_message_mb,
                                 "edge-client --max-message-mb")
        if message:
            raise CloudError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _count(self, up: int, down: int) -> None:
        self.bytes_up += up
        self.bytes_down += down


def _first_half(reply: StepReply) -> bool:
    """A U-shaped step's first reply: the middle's output, nothing applied yet."""
    return reply.output is not None and reply.grad is None and not reply.duplicate


def _cloud_error(err: grpc.RpcError, what: str, advice: str = "") -> CloudError:
    code = err.code()
    reason = f"{advice} (gRPC: {err.details()})" if advice else err.details()
    return CloudError(code, f"{what} failed: {code.name if code else 'UNKNOWN'}: {reason}")
