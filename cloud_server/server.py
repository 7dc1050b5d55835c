"""Start and stop a cloud server: the servicer plus the standard health and reflection services."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_server.checkpoints import Checkpointer
from cloud_server.config import ServerConfig
from cloud_server.servicer import SplitLearningServicer
from splitnet import wire
from splitnet.v1 import split_pb2_grpc

log = logging.getLogger(__name__)


class CloudServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        if config.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {config.device}: CUDA is not available on this machine (use --device cpu)")
        self.servicer = SplitLearningServicer(Checkpointer(config.checkpoint_dir or None, config.checkpoint_every),
                                              config.device, config.max_message_mb, observer=_tap(config.tap_dir))
        self.health = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                                   options=wire.grpc_options(config.max_message_mb))
        split_pb2_grpc.add_SplitLearningServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (wire.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = 0

    def start(self) -> int:
        address = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        self.port = self._server.add_insecure_port(f"{address}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port} (port in use? pass another --port)")
        self._server.start()
        for service in ("", wire.SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self) -> None:
        """Say NOT_SERVING, let in-flight steps finish for the grace period, then checkpoint every job."""
        self.health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_seconds).wait()
        self.servicer.save_all()
        log.info("stopped; %d steps applied", self.servicer.counters.steps_applied)

    def wait(self) -> None:
        self._server.wait_for_termination()


def _tap(tap_dir: str):
    if not tap_dir:
        return None
    from attacks.capture import CaptureWriter

    writer = CaptureWriter(tap_dir, source="tap")
    return lambda method, session, step_id, features, labels: writer.record(
        method, session.session_id, step_id, features, labels, session.job.spec)
