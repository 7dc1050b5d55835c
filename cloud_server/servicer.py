"""The gRPC face of the cloud: sessions, validation, and status codes that name the field.

Everything a peer sends is checked here before it reaches a job, so a bad message is
answered with a status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED) and never touches the decoder or any other session.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
import torch

from cloud_server.checkpoints import Checkpointer
from cloud_server.job import Job, StepOrderError
from splitnet import codec, wire
from splitnet.models import OptimSpec, SplitSpec
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

log = logging.getLogger(__name__)

# Called with every accepted message (method "Train" or "Infer", session, step or
# request id, features, labels): the curious-server tap hooks in here.
StepObserver = Callable[[str, "SessionState", int, pb.Tensor, list[int]], None]


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class SessionState:
    session_id: str
    job: Job
    client_id: str
    grad_codec: str
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


class SplitLearningServicer(split_pb2_grpc.SplitLearningServicer):
    def __init__(self, checkpointer: Checkpointer, device: str = "cpu", max_message_mb: float = 64.0,
                 observer: StepObserver | None = None) -> None:
        self.checkpointer = checkpointer
        self.device = device
        self.max_message_mb = max_message_mb
        self.observer = observer
        self.jobs: dict[str, Job] = checkpointer.load_all(device)
        self.sessions: dict[str, SessionState] = {}
        self.counters = Counters()
        self._lock = threading.Lock()

    # -- RPCs

    def OpenSession(self, request: pb.SessionSpec, context: grpc.ServicerContext) -> pb.Session:
        try:
            spec, optim = _session_spec(request)
            with self._lock:
                job = self.jobs.get(request.job)
                resumed = job is not None and job.checkpoints_written > 0
                if job is None:
                    job = self.jobs[request.job] = Job(request.job, spec, optim, self.device, request.seed)
                    log.info("job %r: new decoder %s cut %s", request.job, spec.arch, job.spec.cut)
                _check_compatible(job, spec, request)
                session = SessionState(uuid.uuid4().hex, job, request.client_id, request.grad_codec)
                self.sessions[session.session_id] = session
            return pb.Session(session_id=session.session_id, last_step_id=job.last_step(request.client_id),
                              job_steps_applied=job.steps_applied, resumed=resumed)
        except Rejected as err:
            context.abort(err.code, err.message)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def Train(self, request_iterator: Iterator[pb.TrainStep], context: grpc.ServicerContext) -> Iterator[pb.TrainResult]:
        for request in request_iterator:
            try:
                yield self._train_one(request)
            except Rejected as err:
                self.counters.add(steps_rejected=1)
                context.abort(err.code, err.message)

    def _train_one(self, request: pb.TrainStep) -> pb.TrainResult:
        size = request.ByteSize()
        self._check_size("TrainStep", size)
        session = self._session(request.session_id)
        job = session.job
        features = self._features(request.features, job, "features")
        labels = _labels(request.labels, features.shape[0], job.spec.num_classes)
        if request.step_id < 1:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "step_id must be >= 1")
        try:
            outcome = job.train_step(session.client_id, request.step_id, features, labels)
        except StepOrderError as err:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
        if not outcome.duplicate:
            session.steps_applied += 1
            if self.observer:
                self.observer("Train", session, request.step_id, request.features, list(request.labels))
            self.checkpointer.maybe_save(job)
        durable = job.durable.get(session.client_id, 0) if self.checkpointer.enabled else request.step_id
        result = pb.TrainResult(step_id=request.step_id, loss=outcome.loss, correct=outcome.correct,
                                duplicate=outcome.duplicate, job_steps_applied=outcome.job_steps_applied,
                                durable_step_id=durable)
        if outcome.grad is not None:
            result.grad.CopyFrom(codec.encode(outcome.grad, session.grad_codec))
        self.counters.add(steps_applied=0 if outcome.duplicate else 1, steps_duplicate=int(outcome.duplicate),
                          bytes_in=size, bytes_out=result.ByteSize())
        return result

    def Infer(self, request_iterator: Iterator[pb.InferRequest], context: grpc.ServicerContext) -> Iterator[pb.Prediction]:
        for request in request_iterator:
            try:
                size = request.ByteSize()
                self._check_size("InferRequest", size)
                session = self._session(request.session_id)
                features = self._features(request.features, session.job, "features")
            except Rejected as err:
                context.abort(err.code, err.message)
            if self.observer:
                self.observer("Infer", session, request.request_id, request.features, [])
            reply = pb.Prediction(request_id=request.request_id,
                                  logits=codec.encode(session.job.infer(features), "fp32"))
            self.counters.add(infer_batches=1, bytes_in=size, bytes_out=reply.ByteSize())
            yield reply

    def CloseSession(self, request: pb.CloseRequest, context: grpc.ServicerContext) -> pb.CloseReply:
        with self._lock:
            session = self.sessions.pop(request.session_id, None)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"session_id {request.session_id!r} is not open")
        return pb.CloseReply(steps_applied=session.steps_applied)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        c = self.counters
        with self._lock:
            open_by_job: dict[str, int] = {}
            for s in self.sessions.values():
                open_by_job[s.job.name] = open_by_job.get(s.job.name, 0) + 1
            jobs = [j for name, j in self.jobs.items() if not request.job or name == request.job]
        reply = pb.StatsReply(steps_applied=c.steps_applied, steps_duplicate=c.steps_duplicate,
                              steps_rejected=c.steps_rejected, infer_batches=c.infer_batches, bytes_in=c.bytes_in,
                              bytes_out=c.bytes_out, sessions_open=sum(open_by_job.values()))
        for job in jobs:
            with job.lock:
                last = {client: st.last_step for client, st in job.clients.items()}
            reply.jobs.add(job=job.name, steps_applied=job.steps_applied, sessions_open=open_by_job.get(job.name, 0),
                           checkpoints_written=job.checkpoints_written, client_last_step=last)
        return reply

    # -- helpers

    def save_all(self) -> None:
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self.checkpointer.save(job)

    def _session(self, session_id: str) -> SessionState:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"session_id {session_id!r} is not open (open one with OpenSession)")
        return session

    def _check_size(self, kind: str, size: int) -> None:
        message = wire.too_large(kind, size, self.max_message_mb, "cloud-server --max-message-mb")
        if message:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _features(self, msg: pb.Tensor, job: Job, field_name: str) -> torch.Tensor:
        try:
            features = codec.decode(msg, field_name)
        except codec.CodecError as err:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        expected = tuple(job.feature_shape)
        if features.dim() != len(expected) + 1 or tuple(features.shape[1:]) != expected:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name}.shape: {list(features.shape)} does not match [batch, {', '.join(map(str, expected))}] "
                           f"of job {job.name!r} ({job.spec.arch} cut {job.spec.cut})")
        if features.shape[0] == 0:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: empty batch")
        if not torch.isfinite(features).all():
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: contains NaN or Inf")
        return features


def _labels(values, batch: int, num_classes: int) -> torch.Tensor:
    labels = torch.tensor(list(values), dtype=torch.long)
    if labels.numel() != batch:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"labels: {labels.numel()} labels for a batch of {batch}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"labels: values must lie in [0, {num_classes})")
    return labels


def _session_spec(request: pb.SessionSpec) -> tuple[SplitSpec, OptimSpec]:
    if not request.job:
        raise ValueError("job: must not be empty")
    if not request.client_id:
        raise ValueError("client_id: must not be empty")
    if request.num_classes < 2:
        raise ValueError(f"num_classes: {request.num_classes} must be >= 2")
    if len(request.input_shape) != 3 or min(request.input_shape) < 1:
        raise ValueError(f"input_shape: {list(request.input_shape)} must be [C, H, W] with positive sides")
    if not request.lr > 0:
        raise ValueError(f"lr: {request.lr} must be > 0")
    codec.check_codec(request.grad_codec, "grad_codec")
    spec = SplitSpec(request.arch, request.cut, request.num_classes, tuple(request.input_shape), request.bottleneck)
    spec.resolved()  # raises ValueError naming arch / cut
    return spec, OptimSpec(request.lr, request.momentum, request.weight_decay)


def _check_compatible(job: Job, spec: SplitSpec, request: pb.SessionSpec) -> None:
    """A job's first session fixes its model and optimizer; later ones must declare the same model."""
    mine = spec.resolved()
    for name in ("arch", "cut", "num_classes", "input_shape", "bottleneck"):
        if getattr(mine, name) != getattr(job.spec, name):
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"{name}: {getattr(mine, name)!r} differs from job {job.name!r}'s {getattr(job.spec, name)!r} "
                           "(use another --job name for another model)")
    if tuple(request.feature_shape) != tuple(job.feature_shape):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                       f"feature_shape: the edge computed {list(request.feature_shape)} but the server's model gives "
                       f"{list(job.feature_shape)} (edge and server versions differ?)")
