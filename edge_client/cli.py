"""`edge-client`: train an encoder through a cloud server's decoder, evaluate, write a report."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from edge_client.config import CEM_CHOICES, ConnectionConfig, DefenseConfig, EdgeConfig, InvalidDefense
from splitnet import security, tracking
from splitnet.cli_util import (add_config_args, add_threads_arg, names_missing_extra, new_parser, parse_args,
                               set_threads, setup_logging)
from splitnet.schedule import LrSchedule
from splitnet.settings import ARCHS, CODECS, DATASETS, NOISE_KINDS, DatasetNotFound, DataSpec
from splitnet.wire import parse_address

log = logging.getLogger("edge_client")

# DefenseConfig fields whose flag is not `--` + the field name with dashes
_DEFENSE_FLAGS = {"lam": "--lambda"}


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs edge clients (edge-client, split-ray, sweeps)."""
    e, c = EdgeConfig(), ConnectionConfig()
    g = p.add_argument_group("connection")
    g.add_argument("--server", default=c.server, help="cloud server HOST:PORT (default %(default)s)")
    g.add_argument("--max-message-mb", type=float, default=c.max_message_mb, help="largest message, MiB")
    g.add_argument("--deadline", type=float, default=c.deadline_s, help="seconds per call / step (default %(default)s)")
    g.add_argument("--pipeline", type=int, default=c.pipeline, metavar="K",
                   help="send up to K steps ahead of the last gradient (bounded staleness; 0: lock-step)")
    g.add_argument("--connect-seconds", type=float, default=c.connect_s,
                   help="try the first connection this long, then fail naming the address (default %(default)s)")
    g.add_argument("--reconnect-seconds", type=float, default=c.reconnect_s,
                   help="keep retrying a server that went away mid-run this long (default %(default)s)")
    g.add_argument("--tls-ca", default=c.tls_ca, help="PEM CA to verify the server: connect with TLS")
    g.add_argument("--tls-cert", default=c.tls_cert, help="PEM client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", default=c.tls_key, help="PEM private key of --tls-cert")
    g.add_argument("--tls-server-name", default=c.tls_server_name, metavar="NAME",
                   help="check the server certificate for NAME instead of --server's host (via a forwarder)")
    g.add_argument("--auth-token", default=c.auth_token, metavar="TOKEN",
                   help=f"bearer token for the server (default: ${security.AUTH_ENV}); prefer the variable: "
                        "arguments show in the process list")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="the private data set")
    g.add_argument("--data-root", default="", help="folder holding the dataset (all but digits)")
    g.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    g.add_argument("--image-size", type=int, default=0, help="digits / imagefolder side in pixels")
    g.add_argument("--arch", default=e.arch, choices=ARCHS, help="model architecture")
    g.add_argument("--cut", default=e.cut, help="cut point (default: the arch's); see --list-cuts")
    g.add_argument("--list-cuts", action="store_true", help="print each arch's cut points and exit")
    g.add_argument("--bottleneck", type=int, default=e.bottleneck, metavar="C",
                   help="conv to C channels + sigmoid at the cut (0: none)")
    g.add_argument("--width", type=float, default=e.width, metavar="W",
                   help="channel multiplier of the architecture, e.g. 0.25 for vgg11_bn on a CPU "
                        "(default %(default)s: full width)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=e.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=e.batch_size, help="samples per training step")
    g.add_argument("--lr", type=float, default=e.lr, help="base learning rate (default %(default)s)")
    g.add_argument("--lr-schedule", default=e.lr_schedule, metavar="SCHEDULE",
                   help="constant | cosine | multistep:E1,E2,...:GAMMA | paper (the CEM paper's multistep "
                        "60,120,180,210 of 240 epochs x0.2, scaled to --epochs: its last quarter runs below lr "
                        "4.1e-4, where CEM's w_lr = 0.001/lr is 1 and CEM pulls at full --lambda); the cloud's "
                        "decoder follows the schedule step for step (default %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=e.warmup_epochs, metavar="E",
                   help="ramp the rate linearly from lr/steps to lr over the first E epochs (default %(default)s)")
    g.add_argument("--augment", default=e.augment, choices=("auto", "on", "off"),
                   help="random crop (padding 4) + horizontal flip of training images, seeded so the attack "
                        "harness can replay them (auto: on for colour images, off for grey ones, also grey files an "
                        "ImageFolder loads as RGB)")
    g.add_argument("--momentum", type=float, default=e.momentum, help="SGD momentum (encoder and decoder)")
    g.add_argument("--weight-decay", type=float, default=e.weight_decay, help="SGD weight decay (encoder and decoder)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N training steps (0: all epochs)")
    g.add_argument("--codec", default=e.codec, choices=CODECS, help="features on the wire")
    g.add_argument("--grad-codec", default=e.grad_codec, choices=CODECS, help="gradients on the wire")
    g.add_argument("--seed", type=int, default=e.seed, help="seeds weights, shuffling, augmentation and defense noise")
    g.add_argument("--job", default=e.job,
                   help="training job name; clients of one job share a decoder (--infer-only: default the "
                        "encoder file's job)")
    g.add_argument("--device", default=e.device, help="torch device of the encoder: cpu, cuda, cuda:1 ...")
    d = DefenseConfig()
    g = p.add_argument_group("defense")
    g.add_argument("--noise", type=float, default=d.noise, metavar="SIGMA", help="obfuscation noise std")
    g.add_argument("--noise-kind", default=d.noise_kind, choices=NOISE_KINDS, help="distribution of --noise")
    g.add_argument("--dropout", type=float, default=d.dropout, metavar="P", help="Bernoulli mask, no rescale")
    g.add_argument("--topk", type=float, default=d.topk, metavar="R", help="zero the smallest fraction R")
    g.add_argument("--nopeek", type=float, default=d.nopeek, metavar="W", help="weight of dCor(x, z)")
    g.add_argument("--cem", default=d.cem, choices=CEM_CHOICES, help="conditional-entropy surrogate (none: no CEM)")
    g.add_argument("--lambda", dest="lam", type=float, default=d.lam, help="CEM weight")
    g.add_argument("--var-threshold", type=float, default=d.var_threshold, help="CEM variance threshold")
    g.add_argument("--cem-scale", type=float, default=None, help="rob_loss scale (default: the surrogate's)")
    g.add_argument("--cem-warmup", type=int, default=None, help="epochs without CEM (default: the surrogate's)")
    g.add_argument("--cem-gates", choices=("on", "off"), default=None,
                   help="gated / slot: per-dimension soft and SNR gates (default: the surrogate's, off; "
                        "docs/CEM.md §4.1)")
    g.add_argument("--freeze-gates", action="store_true", help="CEM gates do not learn from rob_loss")
    add_threads_arg(p)
    p.add_argument("--log-dir", default="", metavar="DIR",
                   help="write TensorBoard event files here: per-epoch loss, accuracy, bytes, rtt, CEM diagnostics "
                        "('track' extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _data(args: argparse.Namespace) -> DataSpec:
    return DataSpec(args.dataset, args.data_root, args.download, args.image_size)


def config_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> EdgeConfig:
    from splitnet import models

    try:
        parse_address(args.server)
        tokens = security.tokens_from([args.auth_token] if args.auth_token else [])
        # Built once here so that a missing or bad PEM file fails now, naming its flag.
        security.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        connection = ConnectionConfig(server=args.server, max_message_mb=args.max_message_mb,
                                      deadline_s=args.deadline, connect_s=args.connect_seconds,
                                      reconnect_s=args.reconnect_seconds,
                                      pipeline=args.pipeline, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                      tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                                      auth_token=tokens[0] if tokens else "")
        defense = DefenseConfig(noise=args.noise, noise_kind=args.noise_kind, dropout=args.dropout, topk=args.topk,
                                nopeek=args.nopeek, cem=args.cem, lam=args.lam, var_threshold=args.var_threshold,
                                cem_scale=args.cem_scale, cem_warmup=args.cem_warmup,
                                cem_gates=None if args.cem_gates is None else args.cem_gates == "on",
                                learn_gates=not args.freeze_gates)
    except InvalidDefense as err:
        p.error(f"{_DEFENSE_FLAGS.get(err.field, '--' + err.field.replace('_', '-'))} must be {err.expected}, "
                f"got {err.value!r}")
    except ValueError as err:
        p.error(str(err))
    for flag, lowest in (("epochs", 1), ("batch_size", 1), ("bottleneck", 0), ("max_steps", 0)):
        if getattr(args, flag) < lowest:
            p.error(f"--{flag.replace('_', '-')} must be >= {lowest}")
    if args.cem != "none" and not args.lam > 0:
        p.error(f"--cem {args.cem} needs a positive CEM weight: pass --lambda (e.g. --lambda 16)")
    if args.pipeline < 0:
        p.error("--pipeline must be >= 0")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    try:
        LrSchedule.parse(args.lr_schedule, args.epochs, warmup_epochs=args.warmup_epochs)
        models.SplitSpec(args.arch, args.cut, width=args.width).resolved()
    except ValueError as err:
        names = {"lr_schedule.warmup_epochs": "--warmup-epochs", "lr_schedule.": "--lr-schedule ", "width:": "--width"}
        message = str(err)
        for field_name, flag in names.items():
            message = message.replace(field_name, flag)
        p.error(message)
    if args.cut and args.cut not in models.cut_points(args.arch):
        p.error(f"--cut {args.cut!r} is not a cut of {args.arch}; valid: {models.cut_points(args.arch)}")
    return EdgeConfig(
        connection=connection,
        data=_data(args),
        defense=defense, arch=args.arch, cut=args.cut, bottleneck=args.bottleneck, width=args.width,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
        augment=args.augment,
        codec=args.codec, grad_codec=args.grad_codec, seed=args.seed, job=args.job,
        client_id=getattr(args, "client_id", ""), max_steps=args.max_steps, device=args.device,
        report=getattr(args, "report", ""), save_encoder=getattr(args, "save_encoder", ""),
        log_dir=tracking.prepared(args.log_dir), progress=not args.no_progress)


@names_missing_extra("edge-client")
def main(argv: list[str] | None = None) -> int:
    p = new_parser("edge-client", __doc__)
    add_training_args(p)
    p.add_argument("--client-id", default="", help="stable id to re-join a job after a restart (default: random)")
    p.add_argument("--report", default="", help="write the JSON report here")
    p.add_argument("--save-encoder", default="", help="write the trained encoder (and its defense settings) here")
    g = p.add_argument_group("inference (--infer-only: no training; see edge_client/infer.py)")
    g.add_argument("--infer-only", action="store_true",
                   help="send images through the trained --encoder and the cloud's decoder of its job, one request "
                        "at a time, and print each prediction and its latency (--report: as JSON)")
    g.add_argument("--encoder", default="", metavar="PATH", help="an encoder file of --save-encoder")
    g.add_argument("--images", default="", metavar="DIR",
                   help="the image files under DIR (default: the --dataset's test split, which adds an accuracy)")
    g.add_argument("--max-images", type=int, default=0, metavar="N", help="the first N images only; 0: all")
    g.add_argument("--infer-batch-size", type=int, default=1, metavar="N", help="images per request")
    add_config_args(p)
    args = parse_args(p, argv)
    if args.list_cuts:
        from splitnet import models

        for arch in ARCHS:
            print(f"{arch}: {' '.join(models.cut_points(arch))}")
        return 0
    if not args.infer_only:  # a missing dataset folder is refused at once, not after seconds of importing torch
        try:
            _data(args).required_root()
        except DatasetNotFound as err:
            p.exit(2, f"edge-client: error: {err}\n")
    config = config_from_args(args, p)
    if args.infer_only:
        return _infer(args, p, config)
    setup_logging(args.verbose)
    set_threads(args.threads)
    from edge_client import report as report_mod
    from edge_client.remote import RemoteCloud
    from edge_client.trainer import run

    return _finish(config, lambda: run(config, RemoteCloud(config.connection)), report_mod.summary,
                   (DatasetNotFound,))


def _finish(config: EdgeConfig, work: Callable[[], dict], summary: Callable[[dict], str],
            bad_input: tuple[type[Exception], ...]) -> int:
    """Run `work` and report it; what the user can fix (exit 2) and a cloud that failed (exit 1)
    each end in one line, not a traceback."""
    from edge_client import report as report_mod
    from edge_client.remote import CloudError

    try:
        result = work()
    except bad_input as err:
        print(f"edge-client: error: {err}", file=sys.stderr)
        return 2
    except CloudError as err:
        print(f"edge-client: error: {err}", file=sys.stderr)
        return 1
    print(summary(result))
    if config.report:
        report_mod.write(result, config.report)
        log.info("report written to %s", config.report)
    return 0


def _infer(args: argparse.Namespace, p: argparse.ArgumentParser, config: EdgeConfig) -> int:
    from pathlib import Path

    if not args.encoder:
        p.error("--infer-only needs --encoder PATH (a file of a training run's --save-encoder)")
    if not Path(args.encoder).is_file():
        p.error(f"--encoder {args.encoder}: no such file")
    if args.images and not Path(args.images).is_dir():
        p.error(f"--images {args.images}: not a folder")
    for flag, lowest in (("max_images", 0), ("infer_batch_size", 1)):
        if getattr(args, flag) < lowest:
            p.error(f"--{flag.replace('_', '-')} must be >= {lowest}")
    setup_logging(args.verbose)
    set_threads(args.threads)
    from edge_client import infer
    from edge_client.remote import RemoteCloud

    settings = infer.InferConfig(args.encoder, args.images, args.max_images, args.infer_batch_size)
    return _finish(config, lambda: infer.run(config, settings, RemoteCloud(config.connection)), infer.summary,
                   (DatasetNotFound, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
