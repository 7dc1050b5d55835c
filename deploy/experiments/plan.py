"""`split-plan`: which cut, codec and defense to deploy on a given link, from a sweep's measurements.

Systems work on split inference picks the cut by latency under bandwidth and ignores what
the features leak; privacy work measures the leak and ignores the link. A `split-sweep`
with a `links` axis measured both on the same runs; this reads its `results.json` and,
for one link, prints the settings on the Pareto front of (time, attack SSIM, accuracy):
none of the others is at least as fast, as private and as accurate and better in one.
Time is `--metric`: seconds per training epoch (`epoch`), the median single-image
inference latency (`latency`, from the sweep's `[run] latency_images`), or training seconds
to the sweep's target accuracy (`time-to-accuracy`).

The recommendation, under the limits given (`--max-ssim`, `--min-accuracy`,
`--max-latency-ms`, `--max-epoch-seconds`): of the settings within them, those no more
than `--time-tolerance` (10%) slower than the fastest, then the most accurate of these,
then the least leaky. Times within a tenth of each other are noise on a shared machine,
and where the link makes no setting much faster, accuracy decides; where it does (a
constrained uplink, int8 features four times smaller than fp32), time decides. The
recommendation is on the front. Only links the sweep ran are planned: their times are
measured, not modelled.

    split-plan --results out/links/results.json --link constrained --max-ssim 0.9 --min-accuracy 0.9
    split-plan --results out/links/results.json --link wifi --metric latency --json
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.experiments.pareto import nondominated
from deploy.link_profiles import DIRECT, PROFILES
from splitnet.cli_util import new_parser

METRICS = {"epoch": ("seconds_per_epoch", "s/epoch", "{:.2f}"), "latency": ("latency_ms_p50", "latency ms p50", "{:.1f}"),
           "time-to-accuracy": ("time_to_accuracy_s", "s to target", "{:.1f}")}


@dataclass(frozen=True)
class PlanConfig:
    results: str
    link: str = ""  # empty: the sweep's only link
    metric: str = "epoch"  # a METRICS key
    method: str = ""  # the attack whose SSIM counts; empty: the sweep's first
    max_ssim: float | None = None
    min_accuracy: float | None = None
    max_latency_ms: float | None = None
    max_epoch_seconds: float | None = None
    time_tolerance: float = 0.1


def choice(row: dict) -> str:
    """A setting as a user deploys it: cut (and bottleneck), codec, defense, the other axes."""
    cut = f"{row['cut']}-b{row['bottleneck']}" if row.get("bottleneck") else row["cut"]
    return " / ".join([cut, row["codec"], row["defense"], *([row["axes"]] if row.get("axes") else [])])


class PlanError(ValueError):
    """The results cannot answer the question; the message names the flag to change."""


def _limits(config: PlanConfig, ssim_key: str) -> list[tuple[str, str, float, int]]:
    """(flag, row key, bound, +1 for a maximum / -1 for a minimum) of each limit given."""
    given = [("--max-ssim", ssim_key, config.max_ssim, 1), ("--min-accuracy", "test_accuracy", config.min_accuracy, -1),
             ("--max-latency-ms", "latency_ms_p50", config.max_latency_ms, 1),
             ("--max-epoch-seconds", "seconds_per_epoch", config.max_epoch_seconds, 1)]
    return [limit for limit in given if limit[2] is not None]


def _within(row: dict, limits) -> list[str]:
    """The limits `row` breaks (empty: it meets them all)."""
    return [flag for flag, key, bound, sign in limits if row.get(key) is None or sign * (row[key] - bound) > 0]


def plan(config: PlanConfig) -> dict:
    """The front and the recommendation for `config.link`, as the JSON `--json` prints (keys in README.md)."""
    try:
        rows = json.loads(Path(config.results).read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise PlanError(f"--results {config.results}: not a split-sweep results.json ({err})") from None
    links = list(dict.fromkeys(r.get("link", DIRECT) for r in rows))
    link = config.link or (links[0] if len(links) == 1 else "")
    if not link:
        raise PlanError(f"the sweep ran {len(links)} links; pick one with --link: {', '.join(links)}")
    if link not in links:
        raise PlanError(f"--link {link}: the sweep did not run it (its links: {', '.join(links)}); add it to the "
                        "sweep's [grid] links and re-run the sweep (the points it has are kept)")
    methods = sorted({k.removesuffix("_ssim") for r in rows for k in r if k.endswith("_ssim") and not
                      k.endswith("_ssim_std")})
    method = config.method or (methods[0] if methods else "")
    if method not in methods:
        raise PlanError(f"--method {method or '(none)'}: the sweep has attack SSIM of {', '.join(methods) or 'none'}")
    time_key, time_label, time_format = METRICS[config.metric]
    mine = [r for r in rows if r.get("link", DIRECT) == link]
    if all(r.get(time_key) is None for r in mine):
        why = {"latency": "set [run] latency_images in the sweep", "time-to-accuracy":
               "no setting reached the sweep's [run] target_accuracy"}.get(config.metric, "re-run the sweep")
        raise PlanError(f"--metric {config.metric}: the sweep has no {time_key} for link {link} ({why})")
    ssim_key = f"{method}_ssim"
    limits = _limits(config, ssim_key)
    for flag, key, _, _ in limits:
        if all(r.get(key) is None for r in mine):
            raise PlanError(f"{flag}: the sweep has no {key} for link {link}")
    usable = [r for r in mine if all(r.get(k) is not None for k in (time_key, ssim_key, "test_accuracy"))]
    front = nondominated([(r[time_key], r[ssim_key], -r["test_accuracy"]) for r in usable])

    def entry(row: dict) -> dict:
        return {"choice": choice(row), "cut": row["cut"], "bottleneck": row["bottleneck"], "codec": row["codec"],
                "defense": row["defense"], "axes": row.get("axes", ""), "time": row[time_key],
                "seconds_per_epoch": row.get("seconds_per_epoch"), "latency_ms_p50": row.get("latency_ms_p50"),
                "time_to_accuracy_s": row.get("time_to_accuracy_s"), "ssim": row[ssim_key],
                "accuracy": row["test_accuracy"], "breaks": _within(row, limits)}

    feasible = [r for r in usable if not _within(r, limits)]
    recommended, reason = None, ""
    if feasible:
        fastest = min(r[time_key] for r in feasible)
        near = [r for r in feasible if r[time_key] <= fastest * (1 + config.time_tolerance)]
        best = min(near, key=lambda r: (-r["test_accuracy"], r[ssim_key]))
        recommended = entry(best)
        reason = (f"{len(feasible)} of {len(usable)} settings meet the limits, {len(near)} within "
                  f"{config.time_tolerance:.0%} of the fastest ({time_format.format(fastest)} {time_label}): "
                  "the most accurate of those, then the least leaky")
    else:
        reason = f"none of the {len(usable)} settings meets the limits"
    profile = PROFILES.get(link)
    return {"results": config.results, "link": link, "link_profile": profile.as_dict() if profile else None,
            "metric": config.metric, "time_key": time_key, "method": method,
            "limits": {flag: bound for flag, _, bound, _ in limits}, "settings": len(usable),
            "front": sorted((entry(usable[i]) for i in front), key=lambda e: e["time"]),
            "recommended": recommended, "reason": reason}


def text(result: dict) -> str:
    """The plan as a person reads it: the link, the front as a table, the recommendation and why."""
    _, time_label, time_format = METRICS[result["metric"]]
    profile = result["link_profile"]
    link = PROFILES[result["link"]].describe() if profile else "none: straight to the cloud, no emulated link"
    limits = ", ".join(f"{flag} {bound:g}" for flag, bound in result["limits"].items()) or "none"
    lines = [f"link {link}", f"time: {time_label}; leakage: {result['method']} attack SSIM; limits: {limits}", "",
             f"Pareto front ({len(result['front'])} of the {result['settings']} settings on this link: no other is as "
             "fast, as private and as accurate, and better in one)", "",
             f"| choice | {time_label} | SSIM | accuracy | within limits |", "|---|---|---|---|---|"]
    for e in result["front"]:
        mark = " **(recommended)**" if result["recommended"] and e["choice"] == result["recommended"]["choice"] else ""
        within = "yes" if not e["breaks"] else "no: " + ", ".join(e["breaks"])
        lines.append(f"| {e['choice']}{mark} | {time_format.format(e['time'])} | {e['ssim']:.3f} | "
                     f"{e['accuracy']:.3f} | {within} |")
    best = result["recommended"]
    lines += [""]
    if best:
        lines.append(f"recommended: {best['choice']}: {time_format.format(best['time'])} {time_label}, SSIM "
                     f"{best['ssim']:.3f}, accuracy {best['accuracy']:.3f} ({result['reason']})")
    else:
        lines.append(f"no recommendation: {result['reason']}; loosen a limit")
    return "\n".join(lines)


def build_parser():
    p = new_parser("split-plan", __doc__)
    p.add_argument("--results", required=True, metavar="RESULTS.json", help="a split-sweep's results.json")
    p.add_argument("--link", default="", help="the link to plan for: a profile the sweep ran (default: its only one)")
    p.add_argument("--metric", default="epoch", choices=tuple(METRICS),
                   help="what time means: seconds per training epoch, single-image latency p50, or seconds to the "
                        "sweep's target accuracy")
    p.add_argument("--method", default="", help="the attack whose SSIM is the leakage (default: the sweep's first)")
    p.add_argument("--max-ssim", type=float, default=None, metavar="S", help="leak no more than this attack SSIM")
    p.add_argument("--min-accuracy", type=float, default=None, metavar="A", help="test accuracy of at least A (0..1)")
    p.add_argument("--max-latency-ms", type=float, default=None, metavar="MS",
                   help="single-image inference latency p50 of at most MS")
    p.add_argument("--max-epoch-seconds", type=float, default=None, metavar="S", help="seconds per epoch of at most S")
    p.add_argument("--time-tolerance", type=float, default=0.1, metavar="F",
                   help="times within this fraction of the fastest count as equally fast")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("max_ssim", "min_accuracy", "max_latency_ms", "max_epoch_seconds", "time_tolerance"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    config = PlanConfig(**{k: v for k, v in vars(args).items() if k != "json"})
    try:
        result = plan(config)
    except PlanError as err:
        p.error(str(err))
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0 if result["recommended"] else 1


if __name__ == "__main__":
    sys.exit(main())
