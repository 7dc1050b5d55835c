"""Start and stop a cloud server: the servicer plus the standard health and reflection services.

Security (see docs/SECURITY.md): TLS or mutual TLS from `--tls-cert/--tls-key/--tls-ca`,
built by `splitnet.security`; bearer tokens checked by `TokenAuth` for the SplitLearning
service. Health and reflection stay open without a token so that load balancers and
generic tools can probe the server: they reveal liveness and the public schema, nothing
about jobs or sessions. (Under mutual TLS the handshake itself needs a client
certificate, for every service.)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_server.checkpoints import Checkpointer
from cloud_server.config import ServerConfig
from cloud_server.servicer import SplitLearningServicer
from cloud_server.streams import StreamSlots
from splitnet import security, wire
from splitnet.v1 import split_pb2_grpc

log = logging.getLogger(__name__)

# Method prefixes reachable without a token.
OPEN_SERVICES = (f"/{health.SERVICE_NAME}/", f"/{reflection.SERVICE_NAME}/")

_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class TokenAuth(grpc.ServerInterceptor):
    """Refuses calls without an accepted bearer token with UNAUTHENTICATED, before any
    request is parsed; health and reflection stay open (see the module docstring)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = tuple(security.check_token(t) for t in tokens)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(OPEN_SERVICES)
                or security.token_matches(security.presented_token(handler_call_details.invocation_metadata),
                                          self._tokens)):
            return handler
        log.debug("unauthenticated call to %s refused", handler_call_details.method)
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                        "missing or wrong auth token (edge-client --auth-token or $" + security.AUTH_ENV + ")")


class ParseRequests(grpc.ServerInterceptor):
    """Handlers get raw bytes and requests are parsed here; bytes that do not parse get
    INVALID_ARGUMENT naming the method.

    Why not let gRPC parse them: with grpcio 1.85, a *streamed* request that fails to
    deserialize leaves `server.stop()` waiting forever (the call is answered INTERNAL,
    but shutdown never completes), so one garbage message from any peer would block the
    checkpoint written at shutdown. tests/test_fuzz.py holds the regression test.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        def parsed(raw: bytes, context: grpc.ServicerContext):
            try:
                return parse(raw)
            except DecodeError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request to {method}: not a valid protobuf message")

        def stream(raws, context: grpc.ServicerContext):
            for raw in raws:
                yield parsed(raw, context)

        def run(request, context: grpc.ServicerContext):
            return behavior(stream(request, context) if handler.request_streaming else parsed(request, context),
                            context)

        return _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](
            run, response_serializer=handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that aborts at once, leaving the request unparsed."""

    def abort(_request, context: grpc.ServicerContext):
        context.abort(code, message)

    return _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](abort)


class CloudServer:
    def __init__(self, config: ServerConfig, servicer_cls: type[SplitLearningServicer] = SplitLearningServicer) -> None:
        """`servicer_cls`: a subclass lets fault-injection tests run the real server around it."""
        self.config = config
        if config.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {config.device}: CUDA is not available on this machine (use --device cpu)")
        if config.max_streams >= config.max_workers:
            log.warning("--max-streams %d >= --max-workers %d: open streams can hold every worker, and health "
                        "checks and Stats are then refused", config.max_streams, config.max_workers)
        self._credentials = security.server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
        interceptors = [*([TokenAuth(config.auth_tokens)] if config.auth_tokens else []), ParseRequests()]
        job_factory, hijack_observer = _hijack(config)
        observers = [o for o in (_tap(config.tap_dir), hijack_observer) if o is not None]
        self.servicer = servicer_cls(Checkpointer(config.checkpoint_dir or None, config.checkpoint_every,
                                                  config.skip_bad_checkpoints),
                                     config.device, config.max_message_mb, observer=_chain(observers),
                                     max_jobs=config.max_jobs, token_identity=bool(config.auth_tokens),
                                     streams=StreamSlots(config.max_streams, config.max_streams_per_peer),
                                     idle_timeout_s=config.idle_timeout_s, job_memory_mb=config.job_memory_mb,
                                     max_memory_mb=config.max_memory_mb, job_idle_s=config.job_idle_s,
                                     log_dir=config.log_dir, job_factory=job_factory)
        self.health = health.HealthServicer()
        # maximum_concurrent_rpcs: past max_workers a call is refused (RESOURCE_EXHAUSTED) instead of
        # queueing forever behind long-lived streams.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                                   interceptors=interceptors, options=wire.server_options(config.max_message_mb),
                                   maximum_concurrent_rpcs=config.max_workers)
        split_pb2_grpc.add_SplitLearningServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (wire.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = 0
        self._stopping = threading.Event()

    def start(self) -> int:
        self.port = wire.add_port(self._server, self.config.host, self.config.port, "--port", self._credentials)
        self._server.start()
        for service in ("", wire.SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s%s", "mutual TLS" if self.config.tls_ca else "TLS" if self._credentials else "plaintext",
                 f", {len(self.config.auth_tokens)} auth token(s)" if self.config.auth_tokens else "")
        if self.config.job_idle_s and self.config.checkpoint_dir:
            threading.Thread(target=self._evict_idle_jobs, daemon=True, name="job-evictor").start()
        return self.port

    def _evict_idle_jobs(self) -> None:
        """Look for idle jobs to evict (`SplitLearningServicer.evict_idle`) four times per
        --job-idle-seconds, at most a minute apart, until the server stops."""
        while not self._stopping.wait(min(self.config.job_idle_s / 4, 60.0)):
            self.servicer.evict_idle()

    def stop(self) -> None:
        """Say NOT_SERVING, finish the steps in progress, then stop and checkpoint every job.

        The gRPC server keeps answering while the servicer drains, so health checks see
        NOT_SERVING and new work gets UNAVAILABLE (which the edge retries against the
        restarted server). `grace_seconds` bounds the whole stop: what is left of it after
        the drain goes to gRPC's own stop for the replies still being sent.
        """
        started = time.monotonic()
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        if not self.servicer.drain.drain(self.config.grace_seconds):
            log.warning("steps still running after %gs of grace", self.config.grace_seconds)
        remaining = max(0.0, self.config.grace_seconds - (time.monotonic() - started))
        self._server.stop(remaining).wait()
        self.servicer.save_all()
        self.servicer.job_log.close()
        log.info("stopped; %d steps applied", self.servicer.counters.steps_applied)

    def wait(self) -> None:
        self._server.wait_for_termination()


def _tap(tap_dir: str):
    if not tap_dir:
        return None
    from splitnet.capture import CaptureWriter, session_model

    writer = CaptureWriter(tap_dir, source="tap")

    def observe(method, session, step_id, features, wire_dtype, labels) -> None:
        if not writer.has_session(session.session_id):
            job = session.job
            writer.record_session(session.session_id, session_model(job.spec, job.feature_shape, job.name))
        writer.record(method, session.session_id, step_id, features, wire_dtype, labels)

    return observe


def _chain(observers: list):
    """One observer calling each of `observers` (None for none)."""
    if len(observers) <= 1:
        return observers[0] if observers else None

    def observe(*args) -> None:
        for observer in observers:
            observer(*args)

    return observe


def _hijack(config: ServerConfig):
    """The job factory and step observer of `--hijack` (an attack tool, cloud_server.hijack), or the
    honest server's (Job, None). The public images are loaded once, at start."""
    if config.hijack == "none":
        from cloud_server.job import Job

        return Job, None
    import functools

    from cloud_server import hijack
    from splitnet.fsha import FshaSettings
    from splitnet.settings import DataSpec

    public = DataSpec(config.public_data, config.public_root, image_size=config.public_image_size)
    images = hijack.public_images(public, config.public_split)
    settings = FshaSettings()
    log.warning("HIJACKING SERVER (%s): edges get attack gradients, not their task's; public data %s %s, %d images",
                config.hijack, config.public_data, config.public_split, len(images))
    recorder = (hijack.HijackRecorder(config.hijack_out, config.hijack_record_every,
                                      hijack.run_info(public, config.public_split, settings,
                                                      config.hijack_record_every))
                if config.hijack_out else None)
    return functools.partial(hijack.HijackJob, public=images, settings=settings), recorder
