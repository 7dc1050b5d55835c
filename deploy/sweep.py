"""`split-sweep`: accuracy vs leakage vs communication over a grid, on real traffic.

Every point runs through real processes on loopback: one `cloud-server`, one
`attacker proxy` in front of it (the eavesdropper, recording everything), and per
point an `edge-client` process followed by `attacker run` / `attacker score`
processes for each attack method. Finished points keep their `result.json` and are not
re-run, so a sweep resumes where it stopped. With `workers > 1` points run in parallel
as Ray tasks (each point is a few single-threaded processes).

Config (TOML):

    [model]                 # edge-client settings shared by every point (underscores become dashes)
    dataset = "digits"      # also what the attacker learns from and the scorer rebuilds, with
    data_root = ""          # data_root and image_size (a relative data_root is taken from the
    arch = "cnn"            # folder split-sweep runs in; `--data-root DIR` overrides it)
    bottleneck = 8
    epochs = 8
    [grid]
    cuts = ["block1", {cut = "block2", bottleneck = 4}]  # a table: a cut with its own bottleneck
    codecs = ["fp32", "int8"]
    seeds = [0, 1]
    [defenses]              # name -> edge-client defense flags (underscores become dashes)
    none = {}
    noise = {noise = 0.1}
    cem_gated = {noise = 0.1, cem = "gated", lambda = 16, cem_warmup = 2}
    [attack]
    methods = ["inversion"] # inversion | rmle (shadow needs the cloud's decoder, which a sweep does not pass)
    epochs = 15             # inverse network: training epochs,
    blocks = 2              #   residual blocks,
    width = 64              #   channels; each unset one is the attacker's default for the data
                            #   (RGB: 50 epochs, 8 blocks, 64 wide, the CEM paper's attacker; else 50, 2, 64)
    rmle_iterations = 500   # rMLE: steps, and (optional) rmle_lr, rmle_tv_weight
    # aux_dataset, aux_data_root: the attacker's own data (default: the edge's dataset and root);
    # aux_limit; args = ["--flag", "value"]: any other `attacker run` flags
    [run]
    workers = 1
    timeout_s = 1800        # the longest any one process of a point may run (training, attack, scoring)

Every point's `result.json` (and `results.json`'s `points`) holds, per method, the
attacker's `run.json` as `<method>_attacker`: the resolved settings that produced its scores.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from deploy.processes import ServerProcess, start_process, start_server
from splitnet.cli_util import names_missing_extra, new_parser, setup_logging

log = logging.getLogger("deploy.sweep")

METRICS = ("test_accuracy", "bytes_up_per_sample", "bytes_down_per_sample", "rtt_ms_p50", "samples_per_second",
           "intra_mse", "cem_pull")  # cem_pull: the last epoch's lambda * w_lr * |g_rob| / |g_task| (CEM rows)
ATTACK_METRICS = ("mse", "ssim", "psnr")


@dataclass(frozen=True)
class Point:
    cut: str
    codec: str
    defense: str
    seed: int
    bottleneck: int | None = None  # None: the [model] table's

    @property
    def key(self) -> str:
        cut = (self.cut or "default") + ("" if self.bottleneck is None else f"-b{self.bottleneck}")
        return f"{cut}__{self.codec}__{self.defense}__s{self.seed}"


# [attack] settings -> `attacker run` flags. Unset ones are left to the attacker, which
# resolves them by the data (attacks.config.default_inverse) and records them in run.json.
ATTACK_FLAGS = {"epochs": "--inverse-epochs", "blocks": "--inverse-blocks", "width": "--inverse-width",
                "rmle_iterations": "--rmle-iterations", "rmle_lr": "--rmle-lr",
                "rmle_tv_weight": "--rmle-tv-weight", "aux_dataset": "--aux-dataset",
                "aux_data_root": "--aux-data-root", "aux_limit": "--aux-limit"}


def _cut(entry: str | dict) -> tuple[str, int | None]:
    """A [grid] cuts entry: "conv1", or {cut = "pool2", bottleneck = 8} for a cut with its own bottleneck."""
    if isinstance(entry, str):
        return entry, None
    unknown = set(entry) - {"cut", "bottleneck"}
    if "cut" not in entry or unknown:
        raise ValueError(f"a cuts entry is a cut name or {{cut = NAME, bottleneck = C}}, got {entry}")
    return str(entry["cut"]), None if entry.get("bottleneck") is None else int(entry["bottleneck"])


@dataclass(frozen=True)
class SweepConfig:
    model: dict = field(default_factory=lambda: {"dataset": "digits"})
    cuts: tuple[tuple[str, int | None], ...] = (("", None),)  # (cut, bottleneck or None: the model's)
    codecs: tuple[str, ...] = ("fp32",)
    seeds: tuple[int, ...] = (0,)
    defenses: dict = field(default_factory=lambda: {"none": {}})
    attacks: tuple[str, ...] = ("inversion",)
    attack: dict = field(default_factory=dict)  # ATTACK_FLAGS keys -> values
    attack_args: tuple[str, ...] = ()
    workers: int = 1
    timeout_s: float = 1800.0  # per process (edge-client, attacker run, attacker score) of a point

    def __post_init__(self) -> None:
        unknown = set(self.attack) - set(ATTACK_FLAGS)
        if unknown:
            raise ValueError(f"unknown [attack] key(s) {sorted(unknown)}; known: methods, args, {sorted(ATTACK_FLAGS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        grid, attack, run = d.get("grid", {}), dict(d.get("attack", {})), d.get("run", {})
        unknown = set(d) - {"model", "grid", "defenses", "attack", "run"}
        if unknown:
            raise ValueError(f"unknown sweep config section(s) {sorted(unknown)}")
        methods, args = attack.pop("methods", ["inversion"]), attack.pop("args", [])
        return cls(model=d.get("model", {}), cuts=tuple(_cut(c) for c in grid.get("cuts", [""])),
                   codecs=tuple(grid.get("codecs", ["fp32"])), seeds=tuple(grid.get("seeds", [0])),
                   defenses=d.get("defenses", {"none": {}}), attacks=tuple(methods), attack=attack,
                   attack_args=tuple(args), workers=int(run.get("workers", 1)),
                   timeout_s=float(run.get("timeout_s", 1800)))

    def points(self) -> list[Point]:
        return [Point(cut, codec, name, seed, bottleneck) for cut, bottleneck in self.cuts for codec in self.codecs
                for name in self.defenses for seed in self.seeds]

    def scorer_data(self) -> dict:
        """The edge's dataset settings, which the scorer needs to rebuild the private images."""
        return {"dataset": self.model.get("dataset", "digits"),
                **{k: self.model[k] for k in ("data_root", "image_size") if self.model.get(k)}}

    def attacker_settings(self) -> dict:
        """`attacker run` settings: the [attack] table's, with auxiliary data of the edge's own
        dataset unless the table names other: attacking an RGB edge with digits fails on the
        channel count, and an attacker that never saw the edge's kind of images understates the leak."""
        edge = self.scorer_data()
        aux = self.attack.get("aux_dataset", edge["dataset"])
        root = edge.get("data_root", "") if aux == edge["dataset"] else ""
        return {"aux_dataset": aux, **({"aux_data_root": root} if root else {}), **self.attack}


def _flags(settings: dict) -> list[str]:
    """{"noise": 0.1, "freeze_gates": True} -> ["--noise", "0.1", "--freeze-gates"]"""
    out: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def _python(*args: str, timeout: float) -> None:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def with_absolute_roots(config: SweepConfig, data_root: str = "") -> SweepConfig:
    """`data_root` (if given) as the edge's data root, and every data root absolute: relative ones
    are taken from where split-sweep was started, whatever folder a Ray worker runs in."""
    model = {**config.model, **({"data_root": data_root} if data_root else {})}
    attack = dict(config.attack)
    for table in (model, attack):
        for key in ("data_root", "aux_data_root"):
            if table.get(key):
                table[key] = str(Path(table[key]).resolve())
    return replace(config, model=model, attack=attack)


def run_point(config: SweepConfig, point: Point, proxy: str, capture: str, out: Path) -> dict:
    """One point: train and serve through the proxy, attack the capture, score; returns the row."""
    out.mkdir(parents=True, exist_ok=True)
    # A fresh job (a fresh decoder) per attempt: a retried point must not train against the
    # decoder an interrupted attempt left half-trained on the long-lived server.
    job = f"sweep-{point.key}-{uuid.uuid4().hex[:6]}"
    edge_args = ["edge_client", "--server", proxy, "--job", job, "--codec", point.codec,
                 "--seed", str(point.seed), "--report", str(out / "edge.json"), "--save-encoder",
                 str(out / "encoder.pt"), "--no-progress", *_flags(config.model),
                 *_flags(config.defenses[point.defense])]
    if point.cut:
        edge_args += ["--cut", point.cut]
    if point.bottleneck is not None:  # after the [model] flags: the last one counts
        edge_args += ["--bottleneck", str(point.bottleneck)]
    _python(*edge_args, timeout=config.timeout_s)
    edge = json.loads((out / "edge.json").read_text())
    row: dict = {"key": point.key, "cut": edge["cut"], "bottleneck": edge["bottleneck"], "codec": point.codec,
                 "defense": point.defense, "seed": point.seed, **{k: edge.get(k) for k in METRICS},
                 "defense_settings": edge["defense"]}
    attack_flags = [flag for key, value in config.attacker_settings().items()
                    for flag in (ATTACK_FLAGS[key], str(value))]
    for method in config.attacks:
        recon, scored = out / f"recon-{method}", out / f"attack-{method}"
        _python("attacks", "run", "--capture", capture, "--session", edge["session_id"], "--method", method,
                "--encoder", str(out / "encoder.pt"), "--seed", str(point.seed), "--out", str(recon), *attack_flags,
                *config.attack_args, timeout=config.timeout_s)
        _python("attacks", "score", "--recon", str(recon), "--edge-report", str(out / "edge.json"), "--out",
                str(scored), *_flags(config.scorer_data()), timeout=config.timeout_s)
        scores = json.loads((scored / "attack.json").read_text())
        row.update({f"{method}_{m}": scores[m] for m in ATTACK_METRICS})
        row[f"{method}_attacker"] = json.loads((recon / "run.json").read_text())  # what produced the scores
        row[f"{method}_grid"] = str((scored / "recon.png").relative_to(out.parent.parent))
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def aggregate(config: SweepConfig, rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every numeric metric, one row per (cut, codec, defense)."""
    numeric = list(METRICS) + [f"{m}_{k}" for m in config.attacks for k in ATTACK_METRICS]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["cut"], row.get("bottleneck"), row["codec"], row["defense"]), []).append(row)
    out = []
    for (cut, bottleneck, codec, defense), members in groups.items():
        agg: dict = {"cut": cut, "bottleneck": bottleneck, "codec": codec, "defense": defense, "seeds": len(members)}
        for key in numeric:
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                agg[key] = statistics.fmean(values)
                agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        agg["grid"] = members[0].get(f"{config.attacks[0]}_grid") if config.attacks else None
        out.append(agg)
    return out


def write_results(config: SweepConfig, rows: list[dict], out: Path) -> list[dict]:
    import csv

    table = aggregate(config, rows)
    (out / "results.json").write_text(json.dumps({"rows": table, "points": rows}, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    return table


class Services:
    """The sweep's long-lived processes: one cloud-server and the eavesdropping proxy in front of it."""

    def __init__(self, out: Path, jobs: int) -> None:
        self.capture = str(out / "capture")
        # Every point is a job of its own, kept until the sweep ends: room for all of them.
        # No checkpoints: nothing reads a finished point's decoder again.
        self.server: ServerProcess = start_server("--max-jobs", str(max(jobs, 1)))
        try:
            self.proxy = start_process(["attacks", "proxy", "--listen", "127.0.0.1:0", "--upstream",
                                        self.server.address, "--capture", self.capture], r"listening on (\S+) ->")
        except Exception:
            self.server.stop()
            raise

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


def run_sweep(config: SweepConfig, out: Path, progress: bool = True) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    points = config.points()
    todo = [p for p in points if not (out / "points" / p.key / "result.json").exists()]
    log.info("%d points, %d already done", len(points), len(points) - len(todo))
    if todo:
        services = Services(out, jobs=4 * len(todo))  # Ray re-runs a task whose worker died up to 3 times
        try:
            _run_all(config, todo, services, out, progress)
        finally:
            services.stop()
    rows = [json.loads((out / "points" / p.key / "result.json").read_text()) for p in points]
    return rows


def _run_all(config: SweepConfig, todo: list[Point], services: Services, out: Path, progress: bool) -> None:
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress)
    start = time.monotonic()
    if config.workers <= 1:
        for point in todo:
            run_point(config, point, services.proxy.address, services.capture, out / "points" / point.key)
            bar.update(1)
            log.info("point %s done (%.0f s elapsed)", point.key, time.monotonic() - start)
    else:
        from deploy.ray_config import ray_environment

        env = ray_environment(local=True)
        os.environ.update(env)
        import ray

        ray.init(num_cpus=config.workers, include_dashboard=False, runtime_env={"env_vars": env})
        try:
            task = ray.remote(num_cpus=1)(run_point)
            pending = {task.remote(config, p, services.proxy.address, services.capture, out / "points" / p.key): p
                       for p in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ray.get(done[0])
                log.info("point %s done (%.0f s elapsed)", pending.pop(done[0]).key, time.monotonic() - start)
                bar.update(1)
        finally:
            ray.shutdown()
    bar.close()


@names_missing_extra("split-sweep")
def main(argv: list[str] | None = None) -> int:
    p = new_parser("split-sweep", __doc__)
    p.add_argument("--config", required=True, help="sweep TOML")
    p.add_argument("--out", required=True, help="output folder (re-run with the same one to resume)")
    p.add_argument("--workers", type=int, default=0, help="points in parallel (default: the config's)")
    p.add_argument("--data-root", default="",
                   help="the edge's dataset folder (default: the config's [model] data_root)")
    args = p.parse_args(argv)
    from deploy.plots import write_report

    setup_logging()
    try:
        config = SweepConfig.from_dict(tomllib.loads(Path(args.config).read_text()))
    except (OSError, tomllib.TOMLDecodeError, ValueError) as err:
        p.error(f"--config {args.config}: {err}")
    if args.workers:
        config = replace(config, workers=args.workers)
    config = with_absolute_roots(config, args.data_root)
    out = Path(args.out)
    rows = run_sweep(config, out)
    table = write_results(config, rows, out)
    write_report(config, table, out)
    print(f"{len(rows)} points; results in {out / 'results.csv'}, report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
