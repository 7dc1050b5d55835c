"""`attacker`: intercept real traffic, invert the captured features, score the reconstructions.

    attacker proxy --listen 127.0.0.1:50052 --upstream 127.0.0.1:50051 --capture cap/
    attacker run --capture cap/ --method inversion --encoder enc.pt --out recon/
    attacker score --recon recon/ --edge-report edge.json --out result/
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from attacks.config import LIGHT_INVERSE, METHODS, RGB_INVERSE, AttackConfig
from splitnet.cli_util import (HelpFormatter, Parser, add_config_args, add_threads_arg, listen_address,
                               names_missing_extra, new_parser, parse_args, set_threads, setup_logging)
from splitnet.settings import DATASETS, DataSpec
from splitnet.tracking import Tracker

log = logging.getLogger("attacks")


def _proxy(args: argparse.Namespace) -> int:
    from attacks.proxy import Proxy, RawForwarder

    if args.raw:
        if not args.capture:
            raise ValueError("--raw needs --capture DIR to record into")
        proxy = RawForwarder(args.listen, args.upstream, args.capture).start()
    else:
        proxy = Proxy(args.listen, args.upstream, args.capture or None, args.max_message_mb).start()
    print(f"attacker proxy listening on {proxy.address} -> {args.upstream}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    proxy.stop()
    return 0


def _run(args: argparse.Namespace) -> int:
    from attacks import harness
    from attacks.runner import Attacker, load_decoder, load_encoder
    from splitnet import capture, data, models
    from splitnet.obfuscation import Obfuscation

    records = [r for r in capture.read_records(args.capture) if (args.only == "all" or r.method == args.only)
               and (not args.session or r.session_id == args.session)]
    if not records:
        raise ValueError(f"no {args.only} records{' of session ' + args.session if args.session else ''} "
                         f"in {args.capture}")
    if args.max_records:  # per-image attacks (rMLE) cost hundreds of encoder passes per image
        records = records[: args.max_records]
    encoder = decoder = None
    defense: dict = {}
    if args.encoder:
        encoder, spec, defense = load_encoder(args.encoder)
    if args.decoder:
        decoder, spec = load_decoder(args.decoder)
    if not (args.encoder or args.decoder):
        raise ValueError("pass --encoder (inversion, rmle) or --decoder (shadow)")
    aux = data.load(DataSpec(args.aux_dataset, args.aux_data_root, image_size=spec.input_shape[-1]))
    aux_set = aux.train if args.aux_split == "train" else aux.test
    if args.aux_limit:
        aux_set = data.shard(aux_set, 0, max(1, len(aux_set) // args.aux_limit))
    obfuscate = Obfuscation.from_settings(defense)
    config = AttackConfig(args.method, args.epochs, args.shadow_epochs, args.rmle_iterations,
                          not args.no_noise_aware, args.seed, width=args.width, blocks=args.inverse_blocks,
                          rmle_lr=args.rmle_lr, rmle_tv_weight=args.rmle_tv_weight)
    tracker = Tracker(args.log_dir)  # before the fit: a missing extra fails before minutes of training
    attacker = Attacker(config, spec, aux_set, encoder=encoder, cloud_decoder=decoder, obfuscate=obfuscate).fit()
    # rMLE trains no network: it has no loss per epoch to log
    for epoch, loss in enumerate(attacker.settings().get("inverse_loss_history", []), 1):
        tracker.scalars(epoch, {f"attack/{args.method}_loss": loss})
    tracker.close()
    out = Path(args.out)
    harness.clear_reconstructions(out)  # a re-run into the same folder must not score the last run's output
    start = time.perf_counter()
    for record in records:
        images = attacker.reconstruct(capture.load_features(args.capture, record))
        harness.write_reconstruction(out, record.seq, record.method, record.session_id, record.step_id, images)
    run_info = {"method": args.method, "records": len(records), "aux_dataset": args.aux_dataset,
                "aux_data_root": args.aux_data_root, "aux_split": args.aux_split, "aux_images": len(aux_set),
                "fit_seconds": attacker.fit_seconds, "reconstruct_seconds": time.perf_counter() - start,
                "noise_aware": config.noise_aware, **attacker.settings(), "seed": args.seed,
                "defense_assumed": defense, "capture": str(args.capture)}
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    print(json.dumps(run_info))
    return 0


def _score(args: argparse.Namespace) -> int:
    import torch

    from attacks import harness
    from attacks.grid import save_grid
    from splitnet import data

    sessions, datasets = [], set()
    for path in args.edge_report:
        report = json.loads(Path(path).read_text())
        dataset = args.dataset or report["dataset"]
        datasets.add(dataset)
        splits = data.load(DataSpec(dataset, args.data_root, image_size=args.image_size))
        sessions.append(harness.PrivateSession(report, splits))
    pairs = harness.align(harness.read_reconstructions(args.recon), harness.by_session_id(sessions))
    run_info = json.loads((Path(args.recon) / "run.json").read_text())
    harness.check_aux_disjoint(pairs, run_info, datasets)
    sample = None
    if args.per_class:
        if len(datasets) > 1:
            raise ValueError(f"--per-class samples one test split; these reports name {sorted(datasets)}")
        targets = data.labels(splits.test)
        indices = data.stratified(targets, args.per_class, args.sample_seed)
        pairs = [harness.select(pairs, indices)]
        sample = harness.describe_sample(indices, targets, args.per_class, args.sample_seed)
    result = harness.score_pairs(pairs, run_info["method"], by_step=args.by_step)
    if sample:
        result["sample"] = sample
    # what a Train step's reconstruction is compared with: the pixels it carried, crop and flip included
    result["train_truth"] = ("augmented as sent (replayed from the report's seed)"
                             if any(s.augment_seed is not None for s in sessions) else "training images as stored")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=2) + "\n")
    if sample:  # as many of each class as the grid has room for, class by class
        per_class = -(-args.grid // len(sample["per_class_images"]))
        rows = harness.class_rows(data.labels(splits.test)[pairs[0].indices], per_class)
        truth, recon = pairs[0].truth[rows], pairs[0].recon[rows]
    else:
        # every pair holds at least one image; by step: the last steps, where the attack has got to
        shown = (pairs[::-1] if args.by_step else pairs)[: args.grid]
        truth = torch.cat([p.truth for p in shown])[: args.grid]
        recon = torch.cat([p.recon for p in shown])[: args.grid]
    save_grid(truth, recon, out / "recon.png", nrow=10 if sample else 8, scale=max(1, 64 // truth.shape[-1]))
    print(json.dumps(result))
    return 0


def _labels(args: argparse.Namespace) -> int:
    from attacks import harness, label_run
    from splitnet import data

    sessions, labels, classes = [], None, set()
    for path in args.edge_report:
        report = json.loads(Path(path).read_text())
        if not report.get("u_shaped"):
            raise ValueError(f"{path}: not a U-shaped run (its labels crossed the wire in clear: nothing to infer)")
        splits = data.load(DataSpec(args.dataset or report["dataset"], args.data_root, image_size=args.image_size))
        sessions.append(harness.PrivateSession(report, splits))
        labels, classes = data.labels(splits.train), classes | {splits.num_classes}
    steps = label_run.captured_steps(args.capture, sessions, labels)
    result = label_run.score(steps, max(classes), args.known_per_class, args.seed, args.pooled_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def build_parser(parser_class: type[Parser] = Parser) -> Parser:
    """The attacker's parser and its subcommands' (`.subcommand("run")`), all of `parser_class`
    (a StrictParser for a caller that checks settings as `attacker run` reads them: a sweep)."""
    p = new_parser("attacker", __doc__, parser_class)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    add_threads_arg(p)
    sub = p.add_subparsers(dest="command", required=True)

    px = sub.add_parser("proxy", help="transparent gRPC proxy that records features", formatter_class=HelpFormatter)
    px.add_argument("--listen", type=listen_address, default="127.0.0.1:50052", help="HOST:PORT to accept the edge on")
    px.add_argument("--upstream", required=True, help="the real cloud-server HOST:PORT")
    px.add_argument("--capture", default="", help="record features into this folder")
    px.add_argument("--max-message-mb", type=float, default=64.0, help="largest message relayed, MiB")
    px.add_argument("--raw", action="store_true",
                    help="relay TCP bytes and record them raw (works under TLS, where nothing is readable)")
    px.set_defaults(func=_proxy)

    run = sub.add_parser("run", help="reconstruct every captured batch", formatter_class=HelpFormatter)
    run.add_argument("--capture", required=True, help="capture folder (proxy or cloud-server --tap)")
    run.add_argument("--method", default="inversion", choices=METHODS,
                     help="inversion: train an inverse network (with --encoder); rmle: optimise each image against "
                          "its features (with --encoder); shadow: train a shadow encoder through --decoder")
    run.add_argument("--encoder", default="", help="encoder file from edge-client --save-encoder (white-box)")
    run.add_argument("--decoder", default="", help="cloud-server job checkpoint (curious cloud, shadow)")
    run.add_argument("--aux-dataset", default="digits", choices=DATASETS, help="the attacker's own data")
    run.add_argument("--aux-data-root", default="", help="folder holding --aux-dataset (all but digits)")
    run.add_argument("--aux-split", default="train", choices=("train", "test"),
                     help="which split is the attacker's: train against inference traffic (the private images "
                          "are the test set), test against training traffic")
    run.add_argument("--aux-limit", type=int, default=0, help="use about this many auxiliary images")
    run.add_argument("--session", default="", help="attack only this session's records")
    run.add_argument("--only", default="Infer", choices=("Infer", "Train", "all"), help="which records to attack")
    run.add_argument("--max-records", type=int, default=0, metavar="N",
                     help="attack only the first N captured batches (0: all); the scorer scores what was attacked")
    defaults = {k: f"default by the input: {getattr(RGB_INVERSE, k)} for RGB, else {getattr(LIGHT_INVERSE, k)}"
                for k in ("epochs", "width", "blocks")}
    run.add_argument("--inverse-epochs", "--epochs", dest="epochs", type=int, metavar="N",
                     help=f"inverse-network training epochs ({defaults['epochs']})")
    run.add_argument("--inverse-width", "--width", dest="width", type=int, metavar="C",
                     help=f"channels of the inverse network ({defaults['width']})")
    run.add_argument("--inverse-blocks", type=int, metavar="N",
                     help=f"residual blocks of the inverse network ({defaults['blocks']})")
    a = AttackConfig()
    run.add_argument("--shadow-epochs", type=int, default=a.shadow_epochs, metavar="N",
                     help="shadow attack: epochs training the shadow encoder through the cloud's decoder")
    run.add_argument("--rmle-iterations", type=int, default=a.rmle_iterations, metavar="N",
                     help="rMLE optimisation steps per captured batch (default %(default)s)")
    run.add_argument("--rmle-lr", type=float, default=a.rmle_lr, help="rMLE Adam learning rate (default %(default)s)")
    run.add_argument("--rmle-tv-weight", type=float, default=a.rmle_tv_weight, metavar="W",
                     help="rMLE total-variation weight lambda_TV (default %(default)s)")
    run.add_argument("--no-noise-aware", action="store_true", help="train on clean features (weaker attacker)")
    run.add_argument("--seed", type=int, default=0, help="seeds the attacker's training")
    run.add_argument("--out", required=True, help="write reconstructions here")
    run.add_argument("--log-dir", default="", metavar="DIR",
                     help="write TensorBoard event files here: the inverse network's training loss per epoch "
                          "('track' extra)")
    add_config_args(run)
    run.set_defaults(func=_run)

    sc = sub.add_parser("score", help="evaluation harness: align with the private images, score, draw",
                        formatter_class=HelpFormatter)
    sc.add_argument("--recon", required=True, help="folder written by attacker run or cloud-server --hijack-out")
    _add_private_data_args(sc, "edge-client report(s) of the attacked sessions (repeatable)")
    sc.add_argument("--grid", type=int, default=16,
                    help="images in recon.png (with --per-class: at least this many, the same number of each class)")
    sc.add_argument("--per-class", type=int, default=0, metavar="N",
                    help="score the inference traffic on a class-stratified sample of the test split: N images of "
                         "each class, the same for every run (0: every image the attack reconstructed)")
    sc.add_argument("--sample-seed", type=int, default=0, help="draws the --per-class sample (default %(default)s)")
    sc.add_argument("--by-step", action="store_true",
                    help="also score each training step apart (train_by_step): how a hijacking cloud's "
                         "reconstructions improve as it moves the encoder")
    sc.add_argument("--out", required=True, help="write attack.json and recon.png here")
    sc.set_defaults(func=_score)

    lb = sub.add_parser("labels", help="label inference: the labels of a U-shaped run from the gradients it sent up",
                        formatter_class=HelpFormatter)
    lb.add_argument("--capture", required=True, help="capture folder (proxy or cloud-server --tap) of the run")
    _add_private_data_args(lb, "edge-client report(s) of the attacked sessions (the harness's truth; repeatable)")
    lb.add_argument("--known-per-class", type=int, default=1, metavar="K",
                    help="labels the attacker knows per class in each batch (default %(default)s)")
    lb.add_argument("--pooled-steps", type=int, default=20, metavar="N",
                    help="also cluster the rows of the last N steps at once (0: every step; default %(default)s)")
    lb.add_argument("--seed", type=int, default=0, help="draws the known labels and seeds k-means")
    lb.add_argument("--out", required=True, help="write labels.json here")
    lb.set_defaults(func=_labels)
    return p


def _add_private_data_args(p: argparse.ArgumentParser, report_help: str) -> None:
    """What the harness needs to rebuild the private data behind the attacked sessions."""
    p.add_argument("--edge-report", action="append", required=True, help=report_help)
    p.add_argument("--dataset", default="", help="private dataset (default: the report's)")
    p.add_argument("--data-root", default="", help="folder holding the private dataset (all but digits)")
    p.add_argument("--image-size", type=int, default=0, help="side the edge loaded the images at (0: the dataset's)")


@names_missing_extra("attacker")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    set_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # OSError: a file or dataset not found, a port in use
        print(f"attacker {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
