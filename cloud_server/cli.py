"""`cloud-server`: serve split training and inference until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from cloud_server.config import HIJACKS, ServerConfig
from splitnet import security
from splitnet import cli_util
from splitnet.cli_util import (Parser, add_config_args, add_threads_arg, names_missing_extra, new_parser, port,
                               set_threads, setup_logging)
from splitnet.settings import InvalidSetting

log = logging.getLogger("cloud_server")


def build_parser() -> Parser:
    d = ServerConfig()
    p = new_parser("cloud-server", __doc__)
    p.add_argument("--host", default=d.host, help="interface to bind (default %(default)s: loopback only)")
    p.add_argument("--port", type=port, default=d.port, help="port; 0 picks a free one (default %(default)s)")
    p.add_argument("--device", default=d.device, help="torch device for the decoders: cpu, cuda, cuda:1 ...")
    p.add_argument("--checkpoint-dir", default=d.checkpoint_dir,
                   help="write job checkpoints here and resume from them at start (default: none)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps of a job between checkpoints (default %(default)s)")
    p.add_argument("--skip-bad-checkpoints", action="store_true",
                   help="a checkpoint that is damaged, foreign or non-finite is logged and its job started afresh "
                        "(default: refuse to start, naming the file)")
    p.add_argument("--max-message-mb", type=float, default=d.max_message_mb,
                   help="largest message accepted or sent, MiB (default %(default)s)")
    p.add_argument("--max-workers", type=int, default=d.max_workers,
                   help="concurrent calls; more are refused with RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="open Train + Infer streams; more are refused at once. Keep it below --max-workers so health "
                        "checks, Stats and OpenSession always find a worker (default %(default)s)")
    p.add_argument("--max-streams-per-peer", type=int, default=d.max_streams_per_peer,
                   help="open Train + Infer streams of one peer, over all its connections: a peer is the remote "
                        "address (without port) plus, with --auth-token or mutual TLS, the caller's token or "
                        "certificate; clients behind one NAT without tokens share it (default %(default)s)")
    p.add_argument("--idle-timeout", dest="idle_timeout_s", type=float, default=d.idle_timeout_s, metavar="SECONDS",
                   help="end a Train / Infer stream that sends no message for this long (default %(default)s)")
    p.add_argument("--max-jobs", type=int, default=d.max_jobs,
                   help="jobs (decoders) held at once; more are refused (default %(default)s)")
    p.add_argument("--job-memory-mb", type=float, default=d.job_memory_mb,
                   help="a new job whose estimated memory (decoder weights, gradients and momentum, activations of "
                        "a 64-sample batch) exceeds this many MiB is refused before it is built (default %(default)s)")
    p.add_argument("--max-memory-mb", type=float, default=d.max_memory_mb,
                   help="the estimates of all jobs held at once stay within this many MiB; a new job past it is "
                        "refused (default %(default)s)")
    p.add_argument("--job-idle-seconds", dest="job_idle_s", type=float, default=d.job_idle_s, metavar="SECONDS",
                   help="with --checkpoint-dir: a job with no open session and no step for this long is checkpointed "
                        "and dropped from memory, and loaded again at its next OpenSession; 0: never "
                        "(default %(default)s)")
    p.add_argument("--grace-seconds", type=float, default=d.grace_seconds,
                   help="on shutdown, time for in-flight steps (default %(default)s)")
    p.add_argument("--tap", dest="tap_dir", default=d.tap_dir,
                   help="curious-server mode: record every received training batch here for the attacker")
    g = p.add_argument_group("ATTACK TOOL: a malicious cloud (docs/ATTACKS_AND_METRICS.md §6). Never run it against "
                             "edges that have not agreed to be attacked")
    g.add_argument("--hijack", default=d.hijack, choices=HIJACKS,
                   help="lie to the edges: answer Train with feature-space hijacking gradients (FSHA) instead of the "
                        "task's, through the unchanged protocol, and reconstruct their private training images "
                        "(default %(default)s: an honest server)")
    g.add_argument("--public-data", default=d.public_data, metavar="DATASET",
                   help="the attacker's own images that the hijack trains on: a --dataset name of edge-client")
    g.add_argument("--public-root", default=d.public_root, metavar="DIR", help="its folder (all but digits)")
    g.add_argument("--public-split", default=d.public_split, choices=("train", "test"),
                   help="which split of --public-data (default %(default)s: for digits, disjoint from the clients' "
                        "training split)")
    g.add_argument("--public-image-size", type=int, default=d.public_image_size, metavar="PX",
                   help="digits / imagefolder side (default: the dataset's, as the edge's)")
    g.add_argument("--hijack-out", default=d.hijack_out, metavar="DIR",
                   help="write the reconstructions (attacker score --recon DIR) and the attack's figures "
                        "(fsha.jsonl) here")
    g.add_argument("--hijack-record-every", type=int, default=d.hijack_record_every, metavar="N",
                   help="reconstruct a client's batch at its step 1 and every N steps (default %(default)s)")
    add_threads_arg(p)
    p.add_argument("--log-dir", default=d.log_dir, metavar="DIR",
                   help="write TensorBoard event files here: one run per job, the decoder's loss and batch accuracy "
                        "per step ('track' extra)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    g = p.add_argument_group("security (see docs/SECURITY.md)")
    g.add_argument("--tls-cert", default=d.tls_cert, help="PEM certificate chain: serve TLS (with --tls-key)")
    g.add_argument("--tls-key", default=d.tls_key, help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=d.tls_ca,
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    g.add_argument("--auth-token", dest="auth_tokens", action="append", metavar="TOKEN",
                   help=f"accept calls bearing this token (repeat for several principals; default: "
                        f"${security.AUTH_ENV} if set, else no token auth). Prefer the variable: "
                        "arguments show in the process list")
    add_config_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The ServerConfig of the command line: the config checks the values, naming each field's flag."""
    p = build_parser()
    args = cli_util.parse_args(p, argv)
    try:
        args.auth_tokens = security.tokens_from(args.auth_tokens or [])
    except ValueError as err:
        p.error(str(err))
    fields = {k: v for k, v in vars(args).items() if k in ServerConfig.__dataclass_fields__}
    try:
        return ServerConfig(**fields), args
    except InvalidSetting as err:
        p.error(err.message(p.flag))


@names_missing_extra("cloud-server")
def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    setup_logging(args.verbose)
    set_threads(args.threads)
    from cloud_server.server import CloudServer

    try:
        server = CloudServer(config)
        port = server.start()
    except (OSError, ValueError) as err:
        print(f"cloud-server: error: {err}", file=sys.stderr)
        return 2
    # Tests and scripts wait for this exact line to learn the port.
    print(f"cloud-server listening on {config.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
