"""Server settings; the CLI maps its flags one to one onto these fields, and the config checks them."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitnet.settings import DATASETS, at_least, require
from splitnet.wire import DEFAULT_MAX_MESSAGE_MB


HIJACKS = ("none", "fsha")  # none: an honest server


@dataclass(frozen=True)
class ServerConfig:
    """A server's settings, checked as they are made (InvalidSetting naming the field), so that a
    server started from Python or a test refuses what `cloud-server` refuses."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (printed on start)
    device: str = "cpu"
    checkpoint_dir: str = ""  # empty: no checkpoints, no resume
    checkpoint_every: int = 50  # steps of a job between checkpoints
    skip_bad_checkpoints: bool = False  # start without a job whose checkpoint is refused (default: exit)
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    max_workers: int = 64  # concurrent RPCs (each Train / Infer stream holds a thread); more are refused
    max_streams: int = 48  # open Train + Infer streams; below max_workers so health, Stats and sessions find a worker
    max_streams_per_peer: int = 16  # open Train + Infer streams of one peer (host + credential), all its connections
    idle_timeout_s: float = 300.0  # a Train / Infer stream without a message for this long is ended
    max_jobs: int = 256  # each job holds a decoder in memory: a cap so peers cannot exhaust it
    job_memory_mb: float = 1024.0  # a new job whose estimated memory exceeds this is refused (cloud_server.memory)
    max_memory_mb: float = 4096.0  # the estimates of all jobs held at once stay within this
    job_idle_s: float = 3600.0  # with checkpoint_dir: a job without session or step this long leaves memory (0: never)
    grace_seconds: float = 5.0  # shutdown: how long in-flight steps may finish
    tap_dir: str = ""  # curious-server tap: record received features here
    log_dir: str = ""  # TensorBoard: one run per job, its loss and accuracy per step (splitnet.tracking)
    tls_cert: str = ""  # PEM certificate chain: serve TLS (with tls_key)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_ca: str = ""  # PEM CA: require client certificates it signed (mutual TLS)
    # Accepted bearer tokens (empty: no token auth). Kept out of repr so logs never show them.
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    # The malicious cloud (an attack tool, cloud_server.hijack): "none" honest, "fsha" feature-space hijacking.
    hijack: str = "none"
    public_data: str = ""  # the hijacker's own images: a dataset name (splitnet.settings.DATASETS)
    public_root: str = ""  # its folder (all but digits)
    public_split: str = "test"  # which split of it: for digits, the test split is disjoint from the clients'
    public_image_size: int = 0  # digits / imagefolder side (0: the dataset's default, as the edge's)
    hijack_out: str = ""  # write the attacker's reconstructions here (splitnet.recon_file); "" : none
    hijack_record_every: int = 10  # reconstruct a client's batch every N of its steps (and its first)

    def __post_init__(self) -> None:
        counts = ("max_jobs", "max_workers", "max_streams", "max_streams_per_peer")
        require("ServerConfig", [
            at_least("checkpoint_every", self.checkpoint_every, 1),
            ("max_message_mb", self.max_message_mb > 0, lambda name: f"{name('max_message_mb')} must be > 0"),
            *((count, getattr(self, count) >= 1, lambda name: f"{', '.join(map(name, counts[:-1]))} and "
                                                               f"{name(counts[-1])} must be >= 1") for count in counts),
            ("idle_timeout_s", self.idle_timeout_s > 0, lambda name: f"{name('idle_timeout_s')} must be > 0"),
            ("job_memory_mb", 0 < self.job_memory_mb <= self.max_memory_mb,
             lambda name: f"{name('job_memory_mb')} must be > 0 and at most {name('max_memory_mb')}"),
            ("job_idle_s", self.job_idle_s >= 0, lambda name: f"{name('job_idle_s')} must be >= 0 (0: never evict)"),
            ("hijack", self.hijack in HIJACKS, lambda name: f"{name('hijack')} must be one of {HIJACKS}"),
            ("public_data", self.hijack == "none" or self.public_data in DATASETS,
             lambda name: f"{name('hijack')} {self.hijack} needs {name('public_data')}: one of {DATASETS} (the "
                          "attacker's own images), got " + repr(self.public_data)),
            ("public_split", self.public_split in ("train", "test"),
             lambda name: f"{name('public_split')} must be train or test"),
            at_least("public_image_size", self.public_image_size, 0),
            at_least("hijack_record_every", self.hijack_record_every, 1),
            ("checkpoint_dir", self.hijack == "none" or not self.checkpoint_dir,
             lambda name: f"{name('hijack')} does not checkpoint its attack networks: drop {name('checkpoint_dir')}"),
        ])
