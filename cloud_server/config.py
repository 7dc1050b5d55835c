"""Server settings; the CLI maps its flags one to one onto these fields."""

from __future__ import annotations

from dataclasses import dataclass

from splitnet.wire import DEFAULT_MAX_MESSAGE_MB


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (printed on start)
    device: str = "cpu"
    checkpoint_dir: str = ""  # empty: no checkpoints, no resume
    checkpoint_every: int = 50  # steps of a job between checkpoints
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    max_workers: int = 64  # concurrent streams (each Train / Infer stream holds a thread)
    grace_seconds: float = 5.0  # shutdown: how long in-flight steps may finish
    tap_dir: str = ""  # curious-server tap: record received features here
