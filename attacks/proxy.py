"""A transparent gRPC proxy between edge and cloud: the eavesdropper of the threat model.

Every call is forwarded as raw bytes, untouched, with its metadata and deadline, so the
edge's results are identical with and without the proxy. On the way through, messages
of the split-learning service are parsed with the public wire contract and their
features recorded (see `splitnet.capture`). It speaks plaintext HTTP/2 only: with TLS
between edge and cloud, it cannot read (or even terminate) the connection.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from splitnet.capture import CaptureWriter, session_model
from splitnet import codec, serde, wire
from splitnet.v1 import split_pb2 as pb

log = logging.getLogger(__name__)

_SERVICES = (pb.DESCRIPTOR.services_by_name["SplitLearning"], health_pb2.DESCRIPTOR.services_by_name["Health"],
             reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
# "/package.Service/Method" -> (client streams, server streams)
METHODS = {f"/{s.full_name}/{m.name}": (m.client_streaming, m.server_streaming) for s in _SERVICES for m in s.methods}
_SPLIT = f"/{wire.SERVICE_NAME}/"


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.Channel, writer: CaptureWriter | None) -> None:
        self.upstream, self.writer = upstream, writer

    def service(self, details: grpc.HandlerCallDetails):
        kind = METHODS.get(details.method)
        if kind is None:
            return None  # gRPC answers UNIMPLEMENTED
        method = details.method
        streams_in, streams_out = kind
        if not streams_in and not streams_out:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx))
        if not streams_in:
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: self._stream(method, iter([req]), ctx, self.upstream.unary_stream, single=True))
        call = self.upstream.stream_stream if streams_out else self.upstream.stream_unary
        handler = grpc.stream_stream_rpc_method_handler if streams_out else grpc.stream_unary_rpc_method_handler
        if streams_out:
            return handler(lambda it, ctx: self._stream(method, it, ctx, call))
        return handler(lambda it, ctx: self._stream_unary(method, it, ctx, call))

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            response = self.upstream.unary_unary(method)(request, metadata=_metadata(context),
                                                         timeout=_timeout(context))
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())
        if method == _SPLIT + "OpenSession":
            self._note_session(request, response)
        return response

    def _stream(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext,
                factory: Callable, single: bool = False) -> Iterator[bytes]:
        upstream_requests = next(requests) if single else self._tapped(method, requests)
        call = factory(method)(upstream_requests, metadata=_metadata(context), timeout=_timeout(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def _stream_unary(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext,
                      factory: Callable) -> bytes:
        try:
            return factory(method)(self._tapped(method, requests), metadata=_metadata(context),
                                   timeout=_timeout(context))
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def _tapped(self, method: str, requests: Iterator[bytes]) -> Iterator[bytes]:
        for raw in requests:
            if self.writer is not None:
                self._capture(method, raw)
            yield raw

    def _capture(self, method: str, raw: bytes) -> None:
        """Record features; a message that does not parse is forwarded all the same."""
        try:
            if method == _SPLIT + "Train":
                step = serde.train_step_from_proto(pb.TrainStep.FromString(raw))
                if step.features is not None:
                    self.writer.record("Train", step.session_id, step.step_id, codec.decode(step.features, "features"),
                                       step.features.dtype, list(step.labels))
                if step.output_grad is not None:  # a U-shaped step's second half: what its labels leak through
                    self.writer.record("TrainGrad", step.session_id, step.step_id,
                                       codec.decode(step.output_grad, "output_grad"), step.output_grad.dtype, [])
            elif method == _SPLIT + "Infer":
                req = serde.infer_request_from_proto(pb.InferRequest.FromString(raw))
                self.writer.record("Infer", req.session_id, req.request_id, codec.decode(req.features, "features"),
                                   req.features.dtype, [])
        except Exception as err:  # noqa: BLE001 - the proxy must forward whatever it cannot read
            log.debug("not captured (%s): %s", method, err)

    def _note_session(self, request: bytes, response: bytes) -> None:
        if self.writer is None:
            return
        spec = serde.session_spec_from_proto(pb.SessionSpec.FromString(request))
        session = serde.session_from_proto(pb.Session.FromString(response))
        self.writer.record_session(session.session_id, session_model(spec.split, spec.feature_shape, spec.job))


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    """The caller's own metadata (auth tokens included); transport headers are gRPC's to set."""
    return [(k, v) for k, v in context.invocation_metadata() if not k.startswith((":", "grpc-")) and k != "user-agent"]


def _timeout(context: grpc.ServicerContext) -> float | None:
    """The caller's remaining deadline; gRPC reports "none" as ~9.2e18 s, which overflows if passed on."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining


class Proxy:
    def __init__(self, listen: str, upstream: str, capture_dir: str | None, max_message_mb: float = 64.0) -> None:
        self.channel = grpc.insecure_channel(upstream, options=wire.grpc_options(max_message_mb))
        self.writer = CaptureWriter(capture_dir, source="proxy") if capture_dir else None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                                  options=wire.server_options(max_message_mb))
        self.server.add_generic_rpc_handlers((_Forwarder(self.channel, self.writer),))
        host, port = wire.parse_address(listen, listen=True)
        self.port = wire.add_port(self.server, host, port, "--listen")
        self.address = f"{host}:{self.port}"

    def start(self) -> "Proxy":
        self.server.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
        self.channel.close()


class RawForwarder:
    """A TCP relay that records every byte both ways: the eavesdropper under TLS.

    The gRPC-level `Proxy` cannot sit inside a TLS connection it holds no key for; this
    one can, and what it records (`raw/NNNN-up.bin`, `raw/NNNN-down.bin`) shows what a
    wire tap gets: plaintext protobuf without TLS, ciphertext with it.
    """

    def __init__(self, listen: str, upstream: str, capture_dir: str) -> None:
        host, port = wire.parse_address(listen, listen=True)
        self.upstream = wire.parse_address(upstream)
        self.raw = Path(capture_dir) / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.sock = wire.listening_socket(host, port, "--listen")
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self._count = 0
        self._stop = threading.Event()

    def start(self) -> "RawForwarder":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            n, self._count = self._count, self._count + 1
            for src, dst, name in ((client, server, f"{n:04d}-up.bin"), (server, client, f"{n:04d}-down.bin")):
                threading.Thread(target=self._pump, args=(src, dst, self.raw / name), daemon=True).start()

    @staticmethod
    def _pump(src, dst, path: Path) -> None:
        with open(path, "ab") as log_file:
            try:
                while chunk := src.recv(65536):
                    log_file.write(chunk)
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(2)
                    except OSError:
                        pass

    def recorded(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.raw.glob("*.bin")))

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
