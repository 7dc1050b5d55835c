"""The gRPC face of the cloud: sessions, validation, and status codes that name the field.

Everything a peer sends is checked here before it reaches a job, so a bad message is
answered with a status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
PERMISSION_DENIED, RESOURCE_EXHAUSTED) and never touches the decoder or any other
session. Cheap checks run first (size, step id, session, declared shape) so a hostile
message costs little before it is refused.

Ownership: a client id of a job belongs to the principal that first opened it (see
`splitnet.security.principal`: the client certificate's name and/or the token's
fingerprint). Sessions are bound to that principal, so another caller can neither drive
a session whose id it learnt nor re-open the client id to take over its step counter.
Without TLS client certificates or tokens every caller is the same anonymous principal.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import grpc
import torch

from cloud_server import bounds, memory
from cloud_server.checkpoints import Checkpointer, file_stem
from cloud_server.config import ServerConfig
from cloud_server.job import Job, NoForward, NotFinite, Retired, StepOrderError, StepOutcome
from cloud_server.keyed_lock import KeyedLocks
from cloud_server.memory import OverBudget
from cloud_server.streams import IdleWatch, StreamSlots, StreamsExhausted, peer_key
from splitnet import codec, security, serde, wire
from splitnet.cloud_api import StepReply
from splitnet.checkpoint_file import CheckpointError
from splitnet.finite import all_finite
from splitnet.models import SplitSpec
from splitnet.schedule import LrSchedule
from splitnet.tracking import JobTrackers
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

log = logging.getLogger(__name__)

# Called with every accepted message (method "Train" or "Infer", session, step or
# request id, the features as decoded, their wire dtype, labels): the curious-server tap
# hooks in here.
StepObserver = Callable[[str, "SessionState", int, torch.Tensor, int, list[int]], None]


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ShuttingDown(Rejected):
    """Not the peer's fault: the edge retries UNAVAILABLE and replays after the restart."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; reconnect and retry")


@dataclass
class SessionState:
    session_id: str
    job: Job
    client_id: str
    grad_codec: str
    owner: str = ""  # the principal that opened it ('' : anonymous)
    steps_applied: int = 0


@dataclass
class Counters:
    steps_applied: int = 0
    steps_duplicate: int = 0
    steps_rejected: int = 0
    infer_batches: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class Drain:
    """Counts the requests being worked on; once draining, refuses new ones.

    Shutdown drains first (health already says NOT_SERVING, the gRPC server still
    answers), so a step that started is finished and answered, and a step that had not
    started gets UNAVAILABLE and is replayed by the edge after the restart.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._draining = False

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        with self._cond:
            if self._draining:
                raise ShuttingDown()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new work; wait up to `timeout` s for the running work. True if all finished."""
        with self._cond:
            self._draining = True
            return self._cond.wait_for(lambda: self._active == 0, timeout)


class SplitLearningServicer(split_pb2_grpc.SplitLearningServicer):
    def __init__(self, checkpointer: Checkpointer, device: str = "cpu", max_message_mb: float = 64.0,
                 observer: StepObserver | None = None, max_jobs: int = ServerConfig.max_jobs,
                 token_identity: bool = False, streams: StreamSlots | None = None,
                 idle_timeout_s: float = ServerConfig.idle_timeout_s, job_memory_mb: float = ServerConfig.job_memory_mb,
                 max_memory_mb: float = ServerConfig.max_memory_mb,
                 job_idle_s: float = ServerConfig.job_idle_s, log_dir: str = "",
                 job_factory: Callable[..., Job] = Job) -> None:
        """`token_identity`: the server checks tokens, so a caller's token is part of its identity.
        `streams`, `idle_timeout_s`: limits on Train / Infer streams (see `cloud_server.streams`).
        `max_jobs`, `job_memory_mb`, `max_memory_mb`: what new jobs may cost (see `cloud_server.memory`).
        `job_idle_s`: see `evict_idle`. `log_dir`: TensorBoard runs of the jobs (`JobTrackers`).
        `job_factory`: builds a new job from (name, spec, optim, device, seed); the hijacking cloud's
        (`cloud_server.hijack`) answers with other gradients under the same checks."""
        self.checkpointer = checkpointer
        self.streams = streams or StreamSlots(ServerConfig.max_streams, ServerConfig.max_streams_per_peer)
        self.idle = IdleWatch(idle_timeout_s)
        self.job_idle_s = job_idle_s
        self.device = device
        self.max_message_mb = max_message_mb
        self.token_identity = token_identity
        self.observer = observer
        self.job_factory = job_factory
        self.job_log = JobTrackers(log_dir)
        checkpointer.check_all(device)  # jobs with a checkpoint are loaded at their first OpenSession
        self.jobs: dict[str, Job] = {}  # the jobs in memory
        memory.warm_up()
        self.budget = memory.JobBudget(max_jobs, job_memory_mb, max_memory_mb)
        self.sessions: dict[str, SessionState] = {}
        self.counters = Counters()
        self.drain = Drain()
        self._client_session: dict[tuple[str, str], str] = {}  # (job, client id) -> its open session
        self._lock = threading.Lock()
        self._job_names = KeyedLocks()

    # -- RPCs

    def OpenSession(self, request: pb.SessionSpec, context: grpc.ServicerContext) -> pb.Session:
        caller = self._caller(context)
        try:
            with self.drain.work():
                return self._open(request, caller)
        except Rejected as err:
            log.debug("OpenSession refused: %s", err.message)
            context.abort(err.code, err.message)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def _open(self, request: pb.SessionSpec, caller: str) -> pb.Session:
        """A new job is estimated, then built under the lock of its name only (see
        `cloud_server.keyed_lock`), so a slow build never stalls other jobs' sessions and steps."""
        spec = serde.session_spec_from_proto(request)
        _check_spec(spec)
        with self._job_names.hold(spec.job):
            with self._lock:
                job = self.jobs.get(spec.job)
            new = job is None
            if new:
                job = self._new_job(spec)
            try:
                session = self._accept(job, spec, caller)
            except Rejected:
                if new:  # a refused OpenSession leaves no job behind
                    self.budget.release(spec.job)
                raise
        return serde.session_to_proto(serde.Session(session.session_id, job.last_step(spec.client_id),
                                                    job.steps_applied, job.restored, job.spec.u_shaped))

    def _accept(self, job: Job, spec: serde.SessionSpec, caller: str) -> SessionState:
        key = (spec.job, spec.client_id)
        with self._lock:
            _check_compatible(job, spec)
            with job.lock:  # a checkpoint may be copying the owners meanwhile
                owner = job.owners.setdefault(spec.client_id, caller)
            if owner != caller:
                raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                               f"client_id {_quote(spec.client_id)} of job {_quote(spec.job)} belongs to "
                               "another principal (each edge needs its own --client-id)")
            job.set_schedule(spec.client_id, spec.optim.schedule)
            self.jobs[spec.job] = job  # a new job is kept only once its first session is accepted
            # A re-open (reconnect) replaces the client's previous session: one per client.
            self.sessions.pop(self._client_session.get(key, ""), None)
            session = SessionState(uuid.uuid4().hex, job, spec.client_id, spec.grad_codec, caller)
            self.sessions[session.session_id] = session
            self._client_session[key] = session.session_id
        return session

    def _new_job(self, spec: serde.SessionSpec) -> Job:
        """Hold the job's estimated memory in the budget (RESOURCE_EXHAUSTED if it does not fit),
        then load it from its checkpoint (an evicted job) or build it; the caller releases the
        hold if the session is refused after all."""
        split = spec.split
        try:
            self.budget.reserve(spec.job, split)
        except OverBudget as err:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
        except RuntimeError as err:  # the input is too small for the encoder's pooling
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input_shape: {list(split.input_shape)} does not fit {split.arch} up to cut "
                           f"{split.resolved().cut}: {str(err)[:200]}") from None
        try:
            job = self._resume(spec.job)
            if job is None:
                # The decoder's optimizer is the job's; each client's schedule is its own (`_accept`).
                job = self.job_factory(spec.job, split, replace(spec.optim, schedule=LrSchedule()), self.device,
                                       spec.seed)
                if spec.init_from_job:
                    self._init_from(job, spec.init_from_job)
                log.info("job %r: new decoder %s cut %s%s", spec.job, split.arch, job.spec.cut,
                         f", from job {spec.init_from_job!r}'s weights" if spec.init_from_job else "")
        except BaseException:
            self.budget.release(spec.job)
            raise
        return job

    def _init_from(self, job: Job, name: str) -> None:
        """Start `job`'s decoder from job `name`'s weights: the one in memory if the server holds it,
        else its checkpoint (read, not adopted: the source job is not opened by this)."""
        with self._lock:
            source = self.jobs.get(name)
        if source is None:
            source = self._resume(name)
        if source is None:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"init_from_job: this server holds no job {_quote(name)}, in memory or as a checkpoint"
                           + ("" if self.checkpointer.enabled else " (it runs without --checkpoint-dir)"))
        mismatch = model_mismatch(source, job.spec)
        if mismatch:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, f"init_from_job: {mismatch}")
        job.adopt_decoder(source)

    def _resume(self, name: str) -> Job | None:
        try:
            return self.checkpointer.load(name, self.device)
        except CheckpointError as err:
            log.error("%s", err)
            if self.checkpointer.skip_bad:
                return None
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"job {_quote(name)}: its checkpoint cannot be resumed (the server's log says why; "
                           "cloud-server --skip-bad-checkpoints starts it afresh)") from None

    def evict_idle(self) -> list[str]:
        """Drop from memory the jobs without an open session and without a step, inference or
        new session for `job_idle_s` seconds, checkpointing them first; the next OpenSession of
        one loads it again. Only with a checkpoint folder: without one, eviction would lose the
        job. A job that never trained has nothing to keep and is simply dropped. Returns the
        names evicted."""
        if not (self.job_idle_s and self.checkpointer.enabled):
            return []
        with self._lock:
            candidates = [name for name, job in self.jobs.items() if self._is_idle(job)]
        evicted = []
        for name in candidates:
            with self._job_names.hold(name):  # no session of it can open meanwhile, so no step comes
                with self._lock:
                    job = self.jobs.get(name)
                    if job is None or not self._is_idle(job):
                        continue
                    del self.jobs[name]
                job.retire()
                self.checkpointer.save(job)
                self.budget.release(name)
            evicted.append(name)
            log.info("job %r: evicted after %.0f s idle (checkpoint kept)", name, job.idle_for())
        return evicted

    def _is_idle(self, job: Job) -> bool:
        """Under self._lock."""
        return job.idle_for() > self.job_idle_s and all(s.job is not job for s in self.sessions.values())

    def Train(self, request_iterator: Iterator[pb.TrainStep], context: grpc.ServicerContext) -> Iterator[pb.TrainResult]:
        caller = self._caller(context)
        for request in self._stream(request_iterator, context, caller):
            try:
                with self.drain.work():
                    result = self._train_one(request, caller)
            except Rejected as err:
                if not isinstance(err, ShuttingDown):
                    self.counters.add(steps_rejected=1)
                log.debug("Train step refused: %s", err.message)
                context.abort(err.code, err.message)
            yield result

    def _train_one(self, request: pb.TrainStep, caller: str) -> pb.TrainResult:
        size = request.ByteSize()
        self._check_size("TrainStep", size)
        step = serde.train_step_from_proto(request)
        if step.step_id < 1:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "step_id: must be >= 1 (a client counts its steps from 1)")
        session = self._session(step.session_id, caller)
        job = session.job
        if job.spec.u_shaped:
            outcome, labels = self._u_step(step, session), []
        else:
            if step.output_grad is not None:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               "output_grad: only a U-shaped session (SessionSpec.head_cut) sends one")
            features = self._features(step.features, job, "features")
            labels = _labels(step.labels, features.shape[0], job.spec.num_classes)
            with _step_errors():
                outcome = job.train_step(session.client_id, step.step_id, features, labels, step.received_step_id)
            if not outcome.duplicate and self.observer:
                self.observer("Train", session, step.step_id, features, step.features.dtype, list(step.labels))
        applied = not outcome.duplicate and outcome.grad is not None  # a U-shaped step's first half applies nothing
        if applied:
            session.steps_applied += 1
            self.job_log.step(file_stem(job.name), outcome.job_steps_applied, outcome.loss,
                              outcome.correct / max(len(labels), 1))
            self.checkpointer.maybe_save(job)
        durable = job.durable.get(session.client_id, 0) if self.checkpointer.enabled else session.job.last_step(
            session.client_id)
        result = train_result(step.step_id, outcome, durable, session.grad_codec)
        self.counters.add(steps_applied=int(applied), steps_duplicate=int(outcome.duplicate),
                          bytes_in=size, bytes_out=result.ByteSize())
        return result

    def _u_step(self, step: serde.TrainStep, session: SessionState) -> StepOutcome:
        """One half of a U-shaped step: the first (features alone) answers the middle's output, the
        second (the output's gradient, and the features if re-sent) applies the step."""
        job = session.job
        if step.labels:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           "labels: a U-shaped session sends none (the edge keeps its labels and its loss)")
        features = None if step.features is None else self._features(step.features, job, "features")
        with _step_errors():
            if step.output_grad is None:
                if features is None:
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                                   "features: a U-shaped step's first half carries them")
                outcome = job.forward_step(session.client_id, step.step_id, features, step.received_step_id)
                if not outcome.duplicate and self.observer:
                    self.observer("Train", session, step.step_id, features, step.features.dtype, [])
                return outcome
            output_grad = self._tensor(step.output_grad, job.output_shape, job, "output_grad")
            outcome = job.backward_step(session.client_id, step.step_id, output_grad, features,
                                        step.received_step_id)
        if not outcome.duplicate and self.observer:
            self.observer("TrainGrad", session, step.step_id, output_grad, step.output_grad.dtype, [])
        return outcome

    def Infer(self, request_iterator: Iterator[pb.InferRequest], context: grpc.ServicerContext) -> Iterator[pb.Prediction]:
        caller = self._caller(context)
        for request in self._stream(request_iterator, context, caller):
            try:
                with self.drain.work():
                    size = request.ByteSize()
                    self._check_size("InferRequest", size)
                    infer = serde.infer_request_from_proto(request)
                    session = self._session(infer.session_id, caller)
                    features = self._features(infer.features, session.job, "features")
                    try:
                        logits = session.job.infer(features)
                    except NotFinite as err:
                        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"features of request {infer.request_id}: {err}") from None
            except Rejected as err:
                log.debug("Infer request refused: %s", err.message)
                context.abort(err.code, err.message)
            if self.observer:
                self.observer("Infer", session, infer.request_id, features, infer.features.dtype, [])
            reply = serde.prediction_to_proto(serde.Prediction(infer.request_id, logits))
            self.counters.add(infer_batches=1, bytes_in=size, bytes_out=reply.ByteSize())
            yield reply

    def CloseSession(self, request: pb.CloseRequest, context: grpc.ServicerContext) -> pb.CloseReply:
        close = serde.close_request_from_proto(request)
        try:
            session = self._session(close.session_id, self._caller(context))
        except Rejected as err:
            context.abort(err.code, err.message)
        key = (session.job.name, session.client_id)
        session.job.forget_replies(session.client_id, close.received_step_id)
        with self._lock:
            self.sessions.pop(session.session_id, None)
            if self._client_session.get(key) == session.session_id:
                del self._client_session[key]
        return serde.close_reply_to_proto(session.steps_applied)

    def Flush(self, request: pb.FlushRequest, context: grpc.ServicerContext) -> pb.FlushReply:
        """Checkpoint the job now if it lacks this client's last step: the edge asks when it has
        finished training, so that a crash between that and the next scheduled checkpoint (which
        may never come: no more steps) does not lose the end of its run. A flush with nothing new
        to write costs no write, so repeating it is cheap."""
        try:
            with self.drain.work():
                session = self._session(serde.flush_request_from_proto(request), self._caller(context))
                job, client = session.job, session.client_id
                if self.checkpointer.enabled and job.durable.get(client, 0) < job.last_step(client):
                    self.checkpointer.save(job)
        except Rejected as err:
            context.abort(err.code, err.message)
        except OSError as err:
            log.error("job %r: checkpoint for Flush failed: %s", job.name, err)
            context.abort(grpc.StatusCode.INTERNAL, f"job {_quote(job.name)}: the checkpoint could not be written "
                                                    "(the server's log says why)")
        return serde.flush_reply_to_proto(job.durable.get(client, 0))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        asked = serde.stats_request_from_proto(request)
        c = self.counters
        with self._lock:
            open_by_job: dict[str, int] = {}
            for s in self.sessions.values():
                open_by_job[s.job.name] = open_by_job.get(s.job.name, 0) + 1
            jobs = [j for name, j in self.jobs.items() if not asked or name == asked]
            on_disk = {name: saved for name, saved in dict(self.checkpointer.on_disk).items()
                       if name not in self.jobs and (not asked or name == asked)}
        lines = []
        for job in jobs:
            with job.lock:
                last = {client: st.last_step for client, st in job.clients.items()}
            lines.append(serde.JobStats(job.name, job.steps_applied, open_by_job.get(job.name, 0),
                                        job.checkpoints_written, last))
        for name, saved in on_disk.items():  # checkpointed, not in memory (not yet loaded, or evicted)
            lines.append(serde.JobStats(name, saved["steps_applied"], client_last_step=saved["client_last_step"]))
        return serde.stats_reply_to_proto(serde.StatsReply(
            c.steps_applied, c.steps_duplicate, c.steps_rejected, c.infer_batches, c.bytes_in, c.bytes_out,
            sum(open_by_job.values()), tuple(line for line in lines if _fits(line))))

    # -- helpers

    def save_all(self) -> None:
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self.checkpointer.save(job)

    def _stream(self, requests: Iterator, context: grpc.ServicerContext, caller: str) -> Iterator:
        """Hold a stream slot for the call's lifetime (RESOURCE_EXHAUSTED at once if none is
        free, overall or for this caller's peer) and end the call if it sits idle (see
        `cloud_server.streams`)."""
        peer = peer_key(context.peer(), caller)
        try:
            self.streams.take(peer)
        except StreamsExhausted as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        if not context.add_callback(lambda: self.streams.give_back(peer)):  # the call has already ended
            self.streams.give_back(peer)
        return self.idle.watch(requests, context)

    def _caller(self, context: grpc.ServicerContext) -> str:
        token = security.presented_token(context.invocation_metadata()) if self.token_identity else ""
        return security.principal(context.auth_context(), token)

    def _session(self, session_id: str, caller: str) -> SessionState:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None:
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"session_id {_quote(session_id)} is not open (unknown or closed; open one with OpenSession)")
        if session.owner != caller:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                           f"session_id {_quote(session_id)} was opened by another principal")
        return session

    def _check_size(self, kind: str, size: int) -> None:
        message = wire.too_large(kind, size, self.max_message_mb, "cloud-server --max-message-mb")
        if message:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _features(self, msg: pb.Tensor | None, job: Job, field_name: str) -> torch.Tensor:
        return self._tensor(msg, job.feature_shape, job, field_name)

    def _tensor(self, msg: pb.Tensor | None, expected: tuple[int, ...], job: Job, field_name: str) -> torch.Tensor:
        """Check the declared shape against the job's (`expected`, batch dim dropped) before decoding
        anything, then the values."""
        if msg is None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: missing")
        expected = tuple(expected)
        shape = tuple(msg.shape)
        if len(shape) != len(expected) + 1 or shape[1:] != expected:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name}.shape: {list(shape[:codec.MAX_DIMS + 1])} does not match "
                           f"[batch, {', '.join(map(str, expected))}] of job {_quote(job.name)} "
                           f"({job.spec.arch} cut {job.spec.cut})")
        if shape[0] == 0:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: empty batch")
        try:
            features = codec.decode(msg, field_name)
        except codec.CodecError as err:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        if not all_finite([features]):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: contains NaN or Inf")
        return features


def _fits(line: serde.JobStats) -> bool:
    """Whether a job's line converts. A number that does not fit its unsigned field (none should:
    checkpoints are range-checked at start) costs that job its line, with an error in the log,
    instead of failing Stats for every job and every caller with UNKNOWN."""
    try:
        serde.job_stats_to_proto(line)
    except (TypeError, ValueError) as err:
        log.error("Stats: job %r left out of the reply: %s", line.job, err)
        return False
    return True


def _quote(text: str, limit: int = 64) -> str:
    """A peer-supplied string for an error message, cut short: status details must stay small."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


@contextlib.contextmanager
def _step_errors() -> Iterator[None]:
    """A job's refusal of a step as the status the edge acts on."""
    try:
        yield
    except StepOrderError as err:
        raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
    except NoForward as err:  # the edge re-sends the step with its features
        raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
    except Retired as err:  # retryable: the edge re-opens its session, which reloads the job
        raise Rejected(grpc.StatusCode.UNAVAILABLE, str(err)) from None
    except NotFinite as err:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"features: {err}") from None
    except ValueError as err:  # e.g. batch norm cannot train on one sample per channel
        field_ = "" if str(err).startswith("output_grad") else "features: the decoder cannot train on this batch: "
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field_}{str(err)[:200]}") from None


def train_result(step_id: int, outcome: StepOutcome, durable: int, grad_codec: str) -> pb.TrainResult:
    """The reply to a training step; `cloud_server.local.LocalCloud` builds the same one."""
    reply = StepReply(outcome.grad, outcome.loss, outcome.correct, outcome.duplicate, outcome.lr, step_id=step_id,
                      job_steps_applied=outcome.job_steps_applied, durable_step_id=durable, output=outcome.output)
    return serde.train_result_to_proto(reply, grad_codec)


def _labels(values, batch: int, num_classes: int) -> torch.Tensor:
    if len(values) != batch:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"labels: {len(values)} labels for a batch of {batch}")
    values = list(values)  # checked as Python ints: three torch calls on 64 labels took 0.07 ms a step
    if values and (min(values) < 0 or max(values) >= num_classes):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"labels: values must lie in [0, {num_classes})")
    return torch.tensor(values, dtype=torch.long)


def _check_spec(spec: serde.SessionSpec) -> None:
    """Validate a SessionSpec; ValueErrors name the field."""
    split, optim = spec.split, spec.optim
    names = {"job": spec.job, "client_id": spec.client_id, "arch": split.arch, "cut": split.cut,
             "grad_codec": spec.grad_codec, "init_from_job": spec.init_from_job}
    for name, value in names.items():
        if len(value) > bounds.MAX_NAME_CHARS:
            raise ValueError(f"{name}: longer than {bounds.MAX_NAME_CHARS} characters")
    if not spec.job:
        raise ValueError("job: must not be empty")
    if not spec.client_id:
        raise ValueError("client_id: must not be empty")
    bounds.check_model(split.num_classes, split.input_shape, split.bottleneck)
    bounds.check_optim(optim.lr, optim.momentum, optim.weight_decay)
    codec.check_codec(spec.grad_codec, "grad_codec")
    split.resolved()  # raises ValueError naming arch / cut


def model_mismatch(job: Job, spec: SplitSpec) -> str:
    """The first field in which `spec` declares another model than `job`'s, as a message; '' if none."""
    field_ = spec.differs(job.spec)
    return f"{field_[0]}: {field_[1]!r} differs from job {_quote(job.name)}'s {field_[2]!r}" if field_ else ""


def _check_compatible(job: Job, spec: serde.SessionSpec) -> None:
    """A job's first session fixes its model and optimizer; later ones must declare the same model."""
    mismatch = model_mismatch(job, spec.split)
    if mismatch:
        raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, f"{mismatch} (use another --job name for another model)")
    if spec.feature_shape != tuple(job.feature_shape):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                       f"feature_shape: the edge computed {list(spec.feature_shape)[:codec.MAX_DIMS]} but the "
                       f"server's model gives {list(job.feature_shape)} (edge and server versions differ?)")
