"""`split-sweep`: accuracy vs leakage vs communication over a grid, on real traffic.

Every point runs through real processes on loopback: one `cloud-server`, one
`attacker proxy` in front of it (the eavesdropper, recording everything), and per
point an `edge-client` process followed by `attacker run` / `attacker score`
processes for each attack method. With `workers > 1` points run in parallel as Ray
tasks (each point is a few single-threaded processes).

Config (TOML):

    [model]                 # edge-client settings shared by every point: any `edge-client` flag
    dataset = "digits"      # by name (dashes or underscores), checked as the flag checks it. The
    data_root = ""          # dataset, data_root and image_size are also what the attacker learns
    arch = "cnn"            # from and the scorer rebuilds (a relative data_root is taken from the
    bottleneck = 8          # folder split-sweep runs in; `--data-root DIR` overrides it)
    epochs = 8
    [grid]                  # axes: every point is one combination of their values (cartesian product)
    cuts = ["block1", {cut = "block2", bottleneck = 4}]  # a table: a cut with its own bottleneck
    codecs = ["fp32", "int8"]
    seeds = [0, 1]
    links = ["none", "constrained"]  # the edge trains through a `split-link` of this profile
                            #   (deploy/link_profiles.py's PROFILES; "none": straight to the cloud)
    # hijack = ["none", "fsha"]  # the cloud it trains against: the sweep's honest server, or a
                            #   hijacking `cloud-server --hijack fsha` of the point's own (an attack tool;
                            #   with detect = ["none", "alignment"], the edge-client flag, as another axis)
    noise = [0.05, 0.1]     # any other edge-client setting is an axis by its flag name (lambda,
                            #   lr_schedule, epochs, bottleneck, width ...), and any [attack]
    attack.aux_limit = [1000, 5000]  # setting as attack.NAME
    [defenses]              # name -> edge-client settings; an axis of its own, combined with the
    none = {}               # others (an axis may not set what a defense sets)
    dropout = {dropout = 0.2}
    cem_gated = {cem = "gated", lambda = 16, cem_warmup = 2}
    [attack]
    methods = ["inversion"] # inversion | rmle (shadow needs the cloud's decoder, which a sweep does not pass)
    epochs = 15             # inverse network: training epochs,
    blocks = 2              #   residual blocks,
    width = 64              #   channels; each unset one is the attacker's default for the data
                            #   (RGB: 50 epochs, 8 blocks, 64 wide, the CEM paper's attacker; else 50, 2, 64)
    rmle_iterations = 500   # rMLE: steps, and (optional) rmle_lr, rmle_tv_weight
    # aux_dataset, aux_data_root: the attacker's own data (default: the edge's dataset and root);
    # aux_limit; args = ["--flag", "value"]: any other `attacker run` flags
    # two-phase sweeps and the attack's scoring sample, its extra attackers (see README,
    # "Continuing a trained model, and two-phase sweeps"):
    # [base]                # phase A: a base trained once per seed (and model), continued by every point:
    # epochs = 30           #   [model]'s settings, then these, then the point's cut, bottleneck, width,
    # lr_schedule = "cosine"#   data, codec and seed (SHARED_WITH_BASE)
    # [attack] per_class = 100                       # score on 100 test images of each class
    # [attack] variants = {large = {blocks = 4, width = 64}}  # another attacker on the same capture
    # [hijack]              # the hijacking server's settings (its cloud-server flags); unset: the test
    # public_data = "digits"#   split of the edge's own dataset (its data_root, image_size), disjoint from
    # public_split = "test" #   the edge's training split; also public_root, public_image_size
    # hijack_record_every = 10  # the attacker reconstructs a batch at step 1 and every N steps
    [run]
    workers = 1
    timeout_s = 1800        # the longest any one process of a point may run (training, attack, scoring)
    target_accuracy = 0.9   # time_to_accuracy_s: training seconds until an epoch's training accuracy reaches it
    latency_images = 32     # after training, time N single-image requests (edge-client --infer-only) through
                            #   the point's link: latency_ms_p50 / _p99 (0: not measured; part of a point's identity)

Precedence: [model] < the defense's table < the axes (a cut's own bottleneck is an axis value),
and [attack] < its attack.NAME axes.
An unknown key anywhere is an error naming its place and the valid keys; the sweep sets
`server` and `job` itself, and `cuts` / `codecs` / `seeds` are the axes of cut, codec and seed.
Every point's settings then pass edge-client's own checks (a cut of the arch, a CEM weight
for CEM ...) before the first point runs.

A point's folder, `points/<cut>[-b<bottleneck>]__<codec>__<defense>[__<axis>=<value>...]`
`[__link=<profile>][__hijack=<method>]__s<seed>__<hash>`, is named by its resolved settings: a
readable prefix, then a hash of everything that shapes its result (the edge-client settings
that differ from edge-client's defaults, the attacker's settings, methods and args, and a
hijacking server's settings). A finished point keeps `result.json` (written atomically, the
last thing a point writes), so re-running a sweep skips exactly the points whose settings did
not change and runs the others. A failed point's processes left their output in
`<process>.log` in its folder; `--keep-going` runs the other points anyway, records each
failure (error, log) in `failed.json` and exits 1 naming them, as a sweep without it does
at its first failure.

Every point's `result.json` (and `results.json`'s `points`) holds its resolved `settings`
and, per method, the attacker's `run.json` as `<method>_attacker`: the resolved settings
that produced its scores. `results.csv` / `results.json`'s `rows` average over seeds every
group of points alike in all else. `results.json`'s `defense_gains` (and report.md's table of
what a defense adds) pairs every point with a defense trained with the encoder (CEM,
attacker-aware training, pruning) with the point that differs from it only by that defense, at
the same seed: the attack-MSE gain and accuracy change, per seed and averaged, and the gain over
the noise-alone curve at the point's own accuracy (deploy/experiments/gains.py).

Under a link (`links`), the point's edge-client connects to its own `split-link` process
(one device, one link; the points of a parallel sweep do not share one) in front of the
eavesdropping proxy, and the row's `seconds_per_epoch`, `time_to_accuracy_s` and latencies
are what a user of that link waits; bytes are the same as without it. The link changes
neither what is sent nor what is learnt (lock-step training does the same steps at any
speed), only how long it takes.

Under a hijack (`[grid] hijack`), the point's edge trains against a `cloud-server --hijack
fsha` started for that point alone: the attack's networks live in the server's job and in no
checkpoint, so such a point never resumes mid-training (an interrupted one starts over), and
its recordings (`hijack/` in its folder) hold its own session only. `attacker score --by-step`
scores the hijacker's reconstructions of the private training batches against the real ones,
and the row adds `hijack_ssim`, `hijack_mse`, `hijack_psnr`, `hijack_step` (the last recorded
step), `hijack_ssim_max` (the best one), `hijack_ssim_at_detection` (the last recorded step up
to a detector's stop; null without one), `hijack_ssim_by_step`, `hijack_settings` and
`hijack_grid`. The eavesdropping attacks do not run for it (`attacks_skipped` says why: the
hijacker is its attacker, and the proxy stands before the honest server only). Every row has
`hijack` ("none": the honest server), `detected` and `detected_at_step` (`edge-client
--detect`'s, an axis as any flag); an edge stopped by its detector (exit 3) is a finished point,
not a failure: `test_accuracy` null, `detect_reason` its one line, and no eavesdropping attack
(it saved no encoder). `results.csv` averages `detected` over seeds into the share of runs
stopped. Points with hijack "none" keep the names they had before the axis existed.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import replace
from pathlib import Path

from deploy.experiments.config import SweepConfig, check_points, with_absolute_roots
from deploy.experiments.gains import defense_gains
from deploy.experiments.results import finished_rows, keep_results, write_results
from deploy.experiments.runner import SweepFailed, add_log_dir_arg, run_sweep
from splitnet import tracking
from splitnet.cli_util import names_missing_extra, new_parser, setup_logging


def _report(config: SweepConfig, rows: list[dict], out: Path) -> None:
    """results.json / results.csv, report.md and its plots, from these rows."""
    from deploy.experiments.plots import write_report

    out.mkdir(parents=True, exist_ok=True)
    write_report(config, write_results(config, rows, out), out, gains=defense_gains(rows, config.scored))


@names_missing_extra("split-sweep")
def main(argv: list[str] | None = None) -> int:
    p = new_parser("split-sweep", __doc__)
    p.add_argument("--config", required=True, help="sweep TOML")
    p.add_argument("--out", required=True, help="output folder (re-run with the same one to resume)")
    p.add_argument("--workers", type=int, default=0, help="points in parallel (default: the config's)")
    p.add_argument("--data-root", default="",
                   help="the edge's dataset folder (default: the config's [model] data_root)")
    p.add_argument("--keep-going", action="store_true",
                   help="run every point even when some fail; the failures go to OUT/failed.json and the exit "
                        "status is 1 (without it the sweep stops at the first failure)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the results and the report from the points finished so far "
                        "(a long sweep run in parts)")
    p.add_argument("--results", default="", metavar="DIR",
                   help="keep every finished point's result as DIR/KEY.json (settings, metrics, histories; no "
                        "images or checkpoints: a folder to commit), and count the points found there as done: a "
                        "study resumed on another machine, or its report rebuilt with --report-only")
    add_log_dir_arg(p)
    args = p.parse_args(argv)
    import deploy.experiments.plots  # noqa: F401 - without the 'plot' extra this fails now, not after the points ran

    setup_logging()
    try:
        config = SweepConfig.from_dict(tomllib.loads(Path(args.config).read_text()))
        if args.workers:
            config = replace(config, workers=args.workers)
        config = with_absolute_roots(config, args.data_root)
        check_points(config.points())  # a point twice, or one edge-client refuses: a config error, before anything runs
    except (OSError, tomllib.TOMLDecodeError, ValueError) as err:
        p.error(f"--config {args.config}: {err}")
    out = Path(args.out)
    results = Path(args.results) if args.results else None
    if args.report_only:
        points = config.points()
        rows = finished_rows(points, out, results)
        if not rows:
            p.error(f"--report-only: no finished point in {out / 'points'}" + (f" or {results}" if results else ""))
        if results:
            keep_results(rows, results)
        _report(config, rows, out)
        print(f"{len(rows)} of {len(points)} points finished; results in {out / 'results.csv'}, "
              f"report in {out / 'report.md'}")
        return 0
    try:
        rows = run_sweep(config, out, keep_going=args.keep_going, log_dir=tracking.prepared(args.log_dir),
                         results=results)
    except SweepFailed as err:
        if args.keep_going and err.rows:  # the points that finished, reported as such
            _report(config, err.rows, out)
        print(f"split-sweep: {len(err.failures)} point(s) failed (listed in {out / 'failed.json'}):", file=sys.stderr)
        for key, failure in err.failures.items():
            print(f"  {key}: {failure['error']}\n    log: {failure['log']}", file=sys.stderr)
        return 1
    _report(config, rows, out)
    print(f"{len(rows)} points; results in {out / 'results.csv'}, report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    # What a Ray task runs (deploy.experiments.runner, .config) lives in modules, not in __main__:
    # their names travel by reference (Ray would ship __main__'s by value, and a cached parser cannot travel).
    sys.exit(main())
