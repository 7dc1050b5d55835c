"""Edge settings; the CLI maps its flags onto these fields (and `defense` onto DefenseConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_client.defense import DefenseConfig
from splitnet.data import DataSpec

DEFAULT_SCHEDULE = "cosine"
from splitnet.wire import DEFAULT_MAX_MESSAGE_MB


@dataclass(frozen=True)
class ConnectionConfig:
    server: str = "127.0.0.1:50051"
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    deadline_s: float = 30.0  # per call / per training step
    reconnect_s: float = 60.0  # how long to keep retrying an unavailable server
    pipeline: int = 0  # steps sent ahead of the last gradient received (0: lock-step)
    tls_ca: str = ""  # PEM CA that signed the server's certificate; any TLS field on: the channel uses TLS
    tls_cert: str = ""  # PEM client certificate, for a server that requires mutual TLS
    tls_key: str = ""  # PEM private key of tls_cert
    tls_server_name: str = ""  # verify the server certificate for this name (connecting via a forwarder / IP)
    auth_token: str = field(default="", repr=False)  # bearer token; out of repr so logs never show it


@dataclass(frozen=True)
class EdgeConfig:
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    data: DataSpec = field(default_factory=DataSpec)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    arch: str = "cnn"
    cut: str = ""  # empty: the architecture's default
    bottleneck: int = 0
    width: float = 1.0  # channel multiplier of the architecture
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = DEFAULT_SCHEDULE  # constant | cosine | multistep:E1,E2,...:GAMMA (splitnet.schedule)
    warmup_epochs: float = 0.0
    augment: str = "auto"  # auto | on | off: seeded crop + flip of the training images (auto: on for RGB)
    codec: str = "fp32"
    grad_codec: str = "fp32"
    seed: int = 0
    job: str = "default"
    client_id: str = ""  # empty: a fresh random id
    max_steps: int = 0  # stop after this many training steps (0: run all epochs)
    device: str = "cpu"
    report: str = ""
    save_encoder: str = ""  # write the trained encoder here (what an attacker who unpacks the device gets)
    progress: bool = True
