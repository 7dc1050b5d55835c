"""`edge-client`: train an encoder through a cloud server's decoder, evaluate, write a report."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from edge_client.config import (CEM_CHOICES, DETECTORS, HIJACK_EXIT, LABEL_DEFENSES, ConnectionConfig, DefenseConfig,
                                DetectConfig, EdgeConfig)
from splitnet import security, tracking
from splitnet.cli_util import (Parser, add_config_args, add_threads_arg, names_missing_extra, new_parser,
                               parse_args, set_threads, setup_logging)
from splitnet.settings import ARCHS, CODECS, DATASETS, NOISE_KINDS, DatasetNotFound, DataSpec, InvalidSetting
from splitnet.wire import MAX_KEPT_REPLIES, parse_address

log = logging.getLogger("edge_client")


def add_training_args(p: Parser) -> None:
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
    g.add_argument("--init-from", default=e.init_from, metavar="ENCODER_FILE",
                   help="continue a trained model: start the encoder from this --save-encoder file (refused unless "
                        "it is the same arch, cut, width, bottleneck and data shape)")
    g.add_argument("--init-job", default=e.init_job, metavar="JOB",
                   help="start this run's new --job's decoder from the server's job JOB (trained, in memory or "
                        "checkpointed; the same model); with --init-from, a continuation of both halves")
    g.add_argument("--u-shaped", action="store_true",
                   help="the U-shaped split: the cloud runs only the middle, from --cut to --head-cut, and the edge "
                        "keeps the head and the loss, so its labels never leave it (lock-step only; without it the "
                        "cloud runs everything after --cut and gets the labels)")
    g.add_argument("--head-cut", default=e.head_cut, metavar="STAGE",
                   help="--u-shaped: the stage where the cloud's middle ends (default: the last stage, so the edge "
                        "keeps the classifier); a stage after --cut")
    g.add_argument("--label-defense", default=e.label_defense, choices=LABEL_DEFENSES,
                   help="--u-shaped: defend the gradients sent up (they leak the labels): gaussian noise, max_norm "
                        "(every example's gradient as long as the batch's longest), or marvell")
    g.add_argument("--label-defense-strength", type=float, default=e.label_defense_strength, metavar="S",
                   help="--label-defense's strength (docs/ATTACKS_AND_METRICS.md, label leakage)")
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
    g.add_argument("--adv-weight", type=float, default=d.adv_weight, metavar="A",
                   help="attacker-aware training: train a simulated inverse network on the sent features and add "
                        "-A times its reconstruction MSE to the encoder's loss (0: off; docs/DEFENSES.md)")
    g.add_argument("--adv-blocks", type=int, default=d.adv_blocks, metavar="B",
                   help="residual blocks of the simulated attacker (default %(default)s)")
    g.add_argument("--adv-width", type=int, default=d.adv_width, metavar="W",
                   help="channels of the simulated attacker (default %(default)s)")
    g.add_argument("--adv-every", type=int, default=d.adv_every, metavar="K",
                   help="train the simulated attacker, and penalise the encoder, every K steps (default %(default)s)")
    g.add_argument("--adv-lr", type=float, default=d.adv_lr, help="Adam rate of the simulated attacker")
    g.add_argument("--prune-ratio", type=float, default=d.prune_ratio, metavar="R",
                   help="learned channel pruning: zero, and do not send, this share of the feature channels, chosen "
                        "by a score per channel trained with the encoder (and against --adv-weight's attacker)")
    g.add_argument("--prune-freeze", type=int, default=d.prune_freeze, metavar="E",
                   help="learned pruning: after E epochs the channels sent stop changing, so that the decoder "
                        "adapts to them (0: the scores choose them to the end; default %(default)s)")
    t = DetectConfig()
    g = p.add_argument_group("hijacking detection (docs/DEFENSES.md §5)")
    g.add_argument("--detect", default=t.detect, choices=DETECTORS,
                   help="splitguard: send some batches with wrong labels and compare the gradients that come back "
                        "with those of real batches; alignment: no fake batch, check that the returned gradients "
                        "follow the labels. A cloud whose gradients ignore the labels is hijacking the encoder: "
                        "stop, close the session, exit 3 (default %(default)s)")
    for flag, kind, metavar, text in (
            ("--detect-fake-rate", float, "P", "share of the steps sent as fake batches, after --detect-start; the "
             "encoder does not learn from them, the cloud's decoder does (their cost: docs/RESULTS_HIJACK.md)"),
            ("--detect-threshold", float, "S", "detected when the SplitGuard score falls below S (honest ~1, "
             "hijacker ~0.25)"),
            ("--detect-start", int, "STEP", "no fake batch up to this step"),
            ("--detect-every", int, "N", "score every N steps"),
            ("--detect-min-fakes", int, "K", "fake batches before the first score"),
            ("--detect-alignment-threshold", float, "A", "--detect alignment: detected when the label alignment "
             "(same-label minus other-label cosine similarity of the returned per-sample gradients, averaged over "
             "the real batches) falls below A, checked from --detect-start on (honest 0.2 to 0.5, falling as the "
             "model fits; hijacker ~0.06)")):
        g.add_argument(flag, type=kind, default=getattr(t, flag[2:].replace("-", "_")), metavar=metavar,
                       help=text + " (default %(default)s)")
    add_threads_arg(p)
    p.add_argument("--log-dir", default="", metavar="DIR",
                   help="write TensorBoard event files here: per-epoch loss, accuracy, bytes, rtt, CEM diagnostics "
                        "('track' extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _data(args: argparse.Namespace) -> DataSpec:
    return DataSpec(args.dataset, args.data_root, args.download, args.image_size)


def config_from_args(args: argparse.Namespace, p: Parser) -> EdgeConfig:
    """The EdgeConfig of parsed flags: the configs check the values (their message names `p`'s flag
    of each field); here only what is not data, the files named and the server's address."""
    if args.init_from and not Path(args.init_from).is_file():
        p.error(f"--init-from {args.init_from}: no such file (an encoder file of edge-client --save-encoder)")
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
                                learn_gates=not args.freeze_gates, adv_weight=args.adv_weight,
                                adv_blocks=args.adv_blocks, adv_width=args.adv_width, adv_every=args.adv_every,
                                adv_lr=args.adv_lr, prune_ratio=args.prune_ratio,
                                prune_freeze=args.prune_freeze)
        detect = DetectConfig(args.detect, args.detect_fake_rate, args.detect_threshold, args.detect_start,
                              args.detect_every, args.detect_min_fakes, args.detect_alignment_threshold)
        return EdgeConfig(
            connection=connection,
            data=_data(args),
            defense=defense, detect=detect, arch=args.arch, cut=args.cut, bottleneck=args.bottleneck, width=args.width,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
            augment=args.augment,
            codec=args.codec, grad_codec=args.grad_codec, seed=args.seed, job=args.job,
            client_id=getattr(args, "client_id", ""), max_steps=args.max_steps, device=args.device,
            report=getattr(args, "report", ""), save_encoder=getattr(args, "save_encoder", ""),
            init_from=args.init_from, init_job=args.init_job, u_shaped=args.u_shaped, head_cut=args.head_cut,
            label_defense=args.label_defense, label_defense_strength=args.label_defense_strength,
            log_dir=tracking.prepared(args.log_dir), progress=not args.no_progress,
            state_dir=getattr(args, "state_dir", ""), state_every=getattr(args, "state_every", EdgeConfig.state_every),
            resume=getattr(args, "resume", False), fresh_on_bad_state=getattr(args, "fresh_on_bad_state", False))
    except InvalidSetting as err:
        p.error(err.message(p.flag))
    except ValueError as err:
        p.error(str(err))


@names_missing_extra("edge-client")
def main(argv: list[str] | None = None) -> int:
    p = new_parser("edge-client", __doc__)
    add_training_args(p)
    p.add_argument("--client-id", default="", help="stable id to re-join a job after a restart (default: random)")
    p.add_argument("--report", default="", help="write the JSON report here")
    p.add_argument("--save-encoder", default="", help="write the trained encoder (and its defense settings) here")
    g = p.add_argument_group("resumable runs (README: Resuming a killed edge)")
    g.add_argument("--state-dir", default="", metavar="DIR",
                   help="write the edge's state (encoder, optimizer, data position, random generators, CEM, the "
                        "simulated attacker and channel gate) to DIR/edge-state.ckpt at the start, every "
                        "--state-every steps, at each epoch's end and at the end, so that a killed run can --resume")
    g.add_argument("--state-every", type=int, default=EdgeConfig.state_every, metavar="N",
                   help=f"steps between state writes, 1..{MAX_KEPT_REPLIES} (default %(default)s; with --pipeline "
                        "each write first waits for the steps in flight)")
    g.add_argument("--resume", action="store_true",
                   help="carry on from --state-dir's state, exactly as if never interrupted (starts fresh if "
                        "there is none)")
    g.add_argument("--fresh-on-bad-state", action="store_true",
                   help="a damaged state, or one of a run with other settings: start fresh with a warning "
                        "instead of refusing")
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

        for arch in models.architectures():
            info = models.describe(arch)
            print(f"{arch}: {' '.join(info.cuts)} (default {info.default_cut})")
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

    from edge_client.state import StateError
    from splitnet.encoder_file import DoesNotFit

    return _finish(config, lambda: run(config, RemoteCloud(config.connection)), report_mod.summary,
                   (DatasetNotFound, StateError, DoesNotFit))


def _finish(config: EdgeConfig, work: Callable[[], dict], summary: Callable[[dict], str],
            bad_input: tuple[type[Exception], ...]) -> int:
    """Run `work` and report it; what the user can fix (exit 2) and a cloud that failed or lost
    steps (exit 1) each end in one line, not a traceback."""
    from edge_client import report as report_mod
    from edge_client.detect import HijackDetected
    from edge_client.remote import CloudError
    from edge_client.trainer import StepsLost

    try:
        result = work()
    except HijackDetected as err:  # the session is closed; the report says what the detector saw
        print(f"edge-client: stopped: {err.reason}", file=sys.stderr)
        if config.report:
            report_mod.write(err.report, config.report)
        return HIJACK_EXIT
    except bad_input as err:
        print(f"edge-client: error: {err}", file=sys.stderr)
        return 2
    except (CloudError, StepsLost) as err:  # StepsLost: resumed against a server that lost the run's steps
        print(f"edge-client: error: {err}", file=sys.stderr)
        return 1
    print(summary(result))
    if config.report:
        report_mod.write(result, config.report)
        log.info("report written to %s", config.report)
    return 0


def _infer(args: argparse.Namespace, p: argparse.ArgumentParser, config: EdgeConfig) -> int:
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
