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
                            #   (deploy/link.py's PROFILES; "none": straight to the cloud)
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

A point's folder, `points/<cut>[-b<bottleneck>]__<codec>__<defense>[__<axis>=<value>...]__s<seed>__<hash>`,
is named by its resolved settings: a readable prefix, then a hash of everything that shapes
its result (the edge-client settings that differ from edge-client's defaults, the attacker's
settings, methods and args). A finished point keeps `result.json` (written atomically, the
last thing a point writes), so re-running a sweep skips exactly the points whose settings did
not change and runs the others. A failed point's processes left their output in
`<process>.log` in its folder; `--keep-going` runs the other points anyway, records each
failure (error, log) in `failed.json` and exits 1 naming them, as a sweep without it does
at its first failure.

Every point's `result.json` (and `results.json`'s `points`) holds its resolved `settings`
and, per method, the attacker's `run.json` as `<method>_attacker`: the resolved settings
that produced its scores. `results.csv` / `results.json`'s `rows` average over seeds every
group of points alike in all else. `results.json`'s `cem_gains` (and report.md's CEM table)
pairs every CEM point with the point that differs from it only by CEM, at the same seed: the
attack-MSE gain and accuracy change, per seed and averaged (deploy/gains.py).

Under a link (`links`), the point's edge-client connects to its own `split-link` process
(one device, one link; the points of a parallel sweep do not share one) in front of the
eavesdropping proxy, and the row's `seconds_per_epoch`, `time_to_accuracy_s` and latencies
are what a user of that link waits; bytes are the same as without it. The link changes
neither what is sent nor what is learnt (lock-step training does the same steps at any
speed), only how long it takes.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from deploy.experiments.gains import cem_gains
from deploy.link import DIRECT, PROFILES
from deploy.processes import ServerProcess, start_process, start_server
from splitnet import tracking
from splitnet.cli_util import StrictParser, config_setting, names_missing_extra, new_parser, setup_logging
from splitnet.wire import MAX_KEPT_REPLIES

log = logging.getLogger("deploy.sweep")

METRICS = ("test_accuracy", "bytes_up_per_sample", "bytes_down_per_sample", "rtt_ms_p50", "samples_per_second",
           "intra_mse", "cem_pull",  # cem_pull: the last epoch's lambda * w_lr * |g_rob| / |g_task| (CEM rows)
           "seconds_per_epoch", "time_to_accuracy_s", "latency_ms_p50", "latency_ms_p99")
LATENCY_METRICS = ("latency_ms_p50", "latency_ms_p99")  # of the point's latency.json (edge-client --infer-only)
ATTACK_METRICS = ("mse", "ssim", "psnr")
# A row's settings, for HParams (axes: the grid's other swept settings)
POINT_SETTINGS = ("cut", "bottleneck", "codec", "defense", "seed", "link", "axes", "defense_settings")

# [attack] settings -> `attacker run` flags. Unset ones are left to the attacker, which
# resolves them by the data (attacks.config.default_inverse) and records them in run.json.
ATTACK_FLAGS = {"epochs": "--inverse-epochs", "blocks": "--inverse-blocks", "width": "--inverse-width",
                "rmle_iterations": "--rmle-iterations", "rmle_lr": "--rmle-lr",
                "rmle_tv_weight": "--rmle-tv-weight", "aux_dataset": "--aux-dataset",
                "aux_data_root": "--aux-data-root", "aux_limit": "--aux-limit"}
SECTIONS = ("model", "base", "grid", "defenses", "attack", "run")
# Steps between the edge's saved states: at most the replies the server keeps per client (a
# resumed edge gets them again).
STATE_EVERY = MAX_KEPT_REPLIES
# Where data lives on this machine: not part of what a point is, so that a study's kept results
# name the same points on a machine that holds the data elsewhere.
WHERE = frozenset({"data_root", "aux_data_root"})
# Settings a point's base (phase A) takes from the point: what fixes the model, its data and its
# seed, so that the continuation can load it. Its other settings are [model]'s, then [base]'s.
SHARED_WITH_BASE = frozenset({"arch", "cut", "bottleneck", "width", "dataset", "data_root", "image_size", "download",
                              "seed", "codec", "grad_codec"})
RUN_KEYS = {"workers": int, "timeout_s": float, "target_accuracy": float, "latency_images": int}
# edge-client settings the sweep sets itself, and why
SWEEP_OWNED = {"server": "every point trains through the sweep's own proxy and cloud-server",
               "job": "every point is a job of its own", "list_cuts": "it prints the cuts instead of training"}
# [grid] axes with a name of their own -> the edge-client setting they vary
NAMED_AXES = {"cuts": "cut", "codecs": "codec", "seeds": "seed"}
LINKS = "links"  # the [grid] axis of link profiles: not an edge-client setting but where its traffic goes


@functools.cache
def _edge_parser() -> StrictParser:
    """edge-client's own flags (the parser is built without importing torch): the valid sweep keys,
    less those the sweep sets itself; a usage error raises ValueError, as a sweep reports a bad
    config rather than exiting mid-parse."""
    from edge_client.cli import add_training_args

    parser = StrictParser(prog="edge-client", add_help=False)
    add_training_args(parser)
    parser.not_settings |= set(SWEEP_OWNED)  # not a sweep key, nor listed as one; its default stays for `check_points`
    return parser


@functools.cache
def _attacker_parser() -> StrictParser:
    """`attacker run`'s own flags, which check the [attack] values as they will be read."""
    from attacks.cli import build_parser

    return build_parser(StrictParser).subcommand("run")


def _edge_action(key: str) -> argparse.Action:
    return _edge_parser().settings()[key.replace("_", "-")]


def _edge_setting(where: str, key: str, value) -> tuple[str, object]:
    """TOML `key = value` as edge-client's flag reads it, (the flag's name with underscores, the value):
    a value edge-client would refuse fails as the config loads, not hours into the sweep."""
    owned = key.replace("-", "_")
    if owned in SWEEP_OWNED:
        raise ValueError(f"{where}: {key!r} is set by the sweep for every point ({SWEEP_OWNED[owned]}); remove it")
    action, value = config_setting(_edge_parser(), where, key, value)
    return next(f for f in action.option_strings if f.startswith("--"))[2:].replace("-", "_"), value


def _table(where: str, table) -> dict:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table of settings, got {table!r}")
    return table


def _edge_settings(where: str, table: dict) -> dict:
    return dict(_edge_setting(where, key, value) for key, value in _table(where, table).items())


def _attack_setting(where: str, key: str, value):
    if key not in ATTACK_FLAGS:
        table = ["methods", "args"] if where == "[attack]" else []
        raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(table + sorted(ATTACK_FLAGS))}")
    return config_setting(_attacker_parser(), where, ATTACK_FLAGS[key][2:], value)[1]


def _run_value(key: str, value):
    """A [run] value as its key takes it: an int key refuses 2.5 rather than running with 2."""
    kind = RUN_KEYS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"[run] {key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _cut(entry: str | dict) -> tuple[str, int | None]:
    """A [grid] cuts entry: "conv1", or {cut = "pool2", bottleneck = 8} for a cut with its own bottleneck."""
    if isinstance(entry, (list, tuple)):  # as SweepConfig holds it
        entry = {"cut": entry[0], "bottleneck": entry[1]}
    if isinstance(entry, str):
        return _edge_setting("[grid] cuts", "cut", entry)[1], None
    unknown = set(entry) - {"cut", "bottleneck"}
    if "cut" not in entry or unknown:
        raise ValueError(f"[grid] cuts: a cuts entry is a cut name or {{cut = NAME, bottleneck = C}}, got {entry}")
    bottleneck = entry.get("bottleneck")
    return (_edge_setting("[grid] cuts", "cut", entry["cut"])[1],
            None if bottleneck is None else _edge_setting("[grid] cuts", "bottleneck", bottleneck)[1])


def _values(where: str, values) -> list:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{where}: an axis is a non-empty list of values, got {values!r}")
    return list(values)


def _scorer_data(edge: dict) -> dict:
    """The edge's dataset settings, which the scorer needs to rebuild the private images."""
    return {"dataset": edge.get("dataset") or "digits",
            **{k: edge[k] for k in ("data_root", "image_size") if edge.get(k)}}


def _attacker_settings(edge: dict, attack: dict) -> dict:
    """`attacker run` settings: `attack`'s, with auxiliary data of the edge's own dataset unless
    it names other: attacking an RGB edge with digits fails on the channel count, and an attacker
    that never saw the edge's kind of images understates the leak."""
    data = _scorer_data(edge)
    aux = attack.get("aux_dataset", data["dataset"])
    root = data.get("data_root", "") if aux == data["dataset"] else ""
    return {"aux_dataset": aux, **({"aux_data_root": root} if root else {}), **attack}


def _label(value) -> str:
    """An axis value as it reads in a folder name: short, and no character a shell or a file system minds."""
    return re.sub(r"[^\w.+@=-]", "_", str(value))[:24]


def _placeless(settings: tuple[tuple[str, object], ...]) -> dict:
    """`settings` without where the data lives (WHERE): what a point's or a base's identity hashes."""
    return {k: v for k, v in settings if k not in WHERE}


def _digest(obj) -> str:
    """A short, stable hash of plain JSON-able settings: the last part of a point's or base's key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Point:
    """One combination of the grid, fully resolved: what runs is what names it."""

    defense: str
    edge: tuple[tuple[str, object], ...]  # edge-client settings that differ from its defaults, sorted
    attack: tuple[tuple[str, object], ...]  # `attacker run` settings ([attack] keys), sorted
    methods: tuple[str, ...]
    attack_args: tuple[str, ...]
    axes: tuple[tuple[str, object], ...] = ()  # this point's value of each [grid] axis (attack.NAME: the attacker's)
    link: str = DIRECT  # a deploy.link profile the edge trains through; DIRECT: none
    latency_images: int = 0  # single-image requests timed after training (0: none)
    base: "Base | None" = None  # the trained model this point continues (a two-phase sweep); None: from scratch
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()  # more attackers: (name, [attack] settings)
    per_class: int = 0  # inference traffic scored on this many test images of each class (0: all attacked)

    def setting(self, name: str):
        """An edge-client setting of this point, its default where the point does not set it."""
        return dict(self.edge).get(name, _edge_action(name).default)

    def identity(self, seed: bool = True) -> str:
        """A hash of everything that shapes the point's result (with `seed=False`: its group over seeds)."""
        edge = {k: v for k, v in _placeless(self.edge).items() if seed or k != "seed"}
        # link and latency only where set: the points of sweeps older than them keep their names
        measured = {**({"link": self.link} if self.link != DIRECT else {}),
                    **({"latency_images": self.latency_images} if self.latency_images else {}),
                    **({"base": self.base.identity} if self.base else {}),
                    **({"variants": [[name, dict(s)] for name, s in self.variants]} if self.variants else {}),
                    **({"per_class": self.per_class} if self.per_class else {})}
        return _digest({"edge": edge, "attack": _placeless(self.attack), "methods": list(self.methods),
                        "attack_args": list(self.attack_args), **measured})

    @property
    def key(self) -> str:
        axes = dict(self.axes)
        cut = (self.setting("cut") or "default") + (f"-b{axes['bottleneck']}" if "bottleneck" in axes else "")
        others = [f"{name}={_label(value)}" for name, value in self.axes
                  if name not in ("cut", "bottleneck", "codec", "seed")]
        link = [f"link={self.link}"] if self.link != DIRECT else []
        return "__".join([cut, self.setting("codec"), _label(self.defense), *others, *link,
                          f"s{self.setting('seed')}", self.identity()])


@dataclass(frozen=True)
class Base:
    """Phase A of a two-phase sweep: a model trained once, then continued by every point that names
    it (the same seed, model and data; each point its own defense, schedule and epochs)."""

    edge: tuple[tuple[str, object], ...]  # edge-client settings that differ from its defaults, sorted

    @property
    def identity(self) -> str:
        return _digest(_placeless(self.edge))

    @property
    def key(self) -> str:
        return f"base__s{dict(self.edge).get('seed', 0)}__{self.identity}"


@dataclass(frozen=True)
class SweepConfig:
    """A sweep's settings, each checked and converted as the flag it becomes (see the module docstring)."""

    model: dict = field(default_factory=lambda: {"dataset": "digits"})
    cuts: tuple[tuple[str, int | None], ...] = ()  # (cut, bottleneck or None: the model's); empty: not an axis
    codecs: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    axes: tuple[tuple[str, tuple], ...] = ()  # the other edge-client axes: (setting, its values)
    defenses: dict = field(default_factory=lambda: {"none": {}})
    attacks: tuple[str, ...] = ("inversion",)
    attack: dict = field(default_factory=dict)  # ATTACK_FLAGS keys -> values
    attack_axes: tuple[tuple[str, tuple], ...] = ()  # ATTACK_FLAGS keys -> their values
    attack_args: tuple[str, ...] = ()
    links: tuple[str, ...] = ()  # deploy.link profile names (DIRECT: none); empty: not an axis
    workers: int = 1
    timeout_s: float = 1800.0  # per process (edge-client, attacker run, attacker score) of a point
    target_accuracy: float = 0.9  # of time_to_accuracy_s (a report figure, not part of a point)
    latency_images: int = 0  # per point, after training (0: no latency measured)
    base: dict = field(default_factory=dict)  # [base]: phase A's settings over [model]'s; empty: one phase
    variants: dict = field(default_factory=dict)  # [attack] variants: name -> settings over [attack]'s
    per_class: int = 0  # [attack] per_class: `attacker score --per-class` (0: every attacked image)

    def __post_init__(self) -> None:
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("model", _edge_settings("[model]", self.model))
        set_("base", _edge_settings("[base]", self.base))
        if not isinstance(self.variants, dict):
            raise ValueError(f"[attack] variants: expected a table of name = {{settings}}, got {self.variants!r}")
        set_("variants", {name: {key: _attack_setting(f"[attack.variants.{name}]", key, value)
                                 for key, value in _table(f"[attack.variants.{name}]", table).items()}
                          for name, table in self.variants.items()})
        if not isinstance(self.defenses, dict) or not self.defenses:
            raise ValueError(f"[defenses]: expected a table of name = {{settings}}, got {self.defenses!r}")
        set_("defenses", {name: _edge_settings(f"[defenses.{name}]", table) for name, table in self.defenses.items()})
        set_("cuts", tuple(_cut(c) for c in self.cuts))
        for link in self.links:
            if link != DIRECT and link not in PROFILES:
                raise ValueError(f"[grid] links: unknown link profile {link!r}; valid: {DIRECT}, {', '.join(PROFILES)}")
        set_("links", tuple(self.links))
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"[run] target_accuracy: {self.target_accuracy} must lie in (0, 1]")
        if self.latency_images < 0:
            raise ValueError(f"[run] latency_images: {self.latency_images} must be >= 0")
        set_("codecs", tuple(_edge_setting("[grid] codecs", "codec", c)[1] for c in self.codecs))
        set_("seeds", tuple(_edge_setting("[grid] seeds", "seed", s)[1] for s in self.seeds))
        axes = []
        for key, values in self.axes:
            flags = _edge_parser().settings()
            if key.replace("-", "_") not in SWEEP_OWNED and key.replace("_", "-") not in flags:
                raise ValueError(f"[grid]: unknown axis {key!r}; valid axes: {', '.join(NAMED_AXES)}, attack.NAME "
                                 "(an [attack] setting) and any edge-client setting: " + ", ".join(sorted(flags)))
            name = _edge_setting("[grid]", key, _values(f"[grid] {key}", values)[0])[0]
            plural = next((p for p, n in NAMED_AXES.items() if n == name), None)
            if plural:
                raise ValueError(f"[grid] {key}: the {name} axis is named {plural}: {plural} = [...]")
            axes.append((name, tuple(_edge_setting("[grid]", key, v)[1] for v in values)))
        set_("axes", tuple(axes))
        names = [name for name, _ in axes]
        if len(set(names)) < len(names):
            raise ValueError(f"[grid]: an axis is given twice (as two spellings of one flag): {names}")
        if "bottleneck" in names and any(b is not None for _, b in self.cuts):
            raise ValueError("[grid]: bottleneck is an axis and a cuts entry sets one too; keep one of them")
        varied = {*names, *(name for plural, name in NAMED_AXES.items() if getattr(self, plural)),
                  *(["bottleneck"] if any(b is not None for _, b in self.cuts) else [])}
        for defense, table in self.defenses.items():
            both = sorted(set(table) & varied)
            if both:
                raise ValueError(f"[defenses.{defense}] and [grid] both set {both}: a point would not say which "
                                 "counts; keep each setting in one of them")
        set_("attack", {key: _attack_setting("[attack]", key, v) for key, v in self.attack.items()})
        set_("attack_axes", tuple((key, tuple(_attack_setting("[grid] attack", key, v)
                                              for v in _values(f"[grid] attack.{key}", values)))
                                  for key, values in self.attack_axes))
        from attacks.config import METHODS

        unknown = [m for m in self.attacks if m not in METHODS]
        if unknown:
            raise ValueError(f"[attack] methods: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
        set_("attacks", tuple(self.attacks))
        set_("attack_args", tuple(str(a) for a in self.attack_args))

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown sweep config section(s) {unknown}; valid sections: {', '.join(SECTIONS)}")
        grid, attack, run = dict(d.get("grid", {})), dict(d.get("attack", {})), dict(d.get("run", {}))
        bad = sorted(set(run) - set(RUN_KEYS))
        if bad:
            raise ValueError(f"[run]: unknown key(s) {bad}; valid keys: {', '.join(RUN_KEYS)}")
        attack_grid = grid.pop("attack", {})
        if not isinstance(attack_grid, dict):
            raise ValueError(f"[grid] attack: expected attack.NAME = [values], got {attack_grid!r}")
        named = {plural: _values(f"[grid] {plural}", grid.pop(plural)) for plural in (*NAMED_AXES, LINKS)
                 if plural in grid}
        run = {key: _run_value(key, run[key]) for key in RUN_KEYS if key in run}
        per_class = attack.pop("per_class", 0)
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
            raise ValueError(f"[attack] per_class: expected an integer >= 0 (test images of each class), got {per_class!r}")
        return cls(model=d.get("model", {}), base=d.get("base", {}), variants=attack.pop("variants", {}),
                   per_class=per_class, cuts=tuple(_cut(c) for c in named.get("cuts", [])),
                   codecs=tuple(named.get("codecs", [])), seeds=tuple(named.get("seeds", [])),
                   axes=tuple(grid.items()), defenses=d.get("defenses", {"none": {}}),
                   attacks=tuple(attack.pop("methods", ["inversion"])), attack_args=tuple(attack.pop("args", [])),
                   attack=attack, attack_axes=tuple(attack_grid.items()), links=tuple(named.get(LINKS, [])), **run)

    def points(self) -> list[Point]:
        """Every combination of the axes and the defenses, resolved into its settings; seeds
        vary fastest, so the seeds of one setting run one after another."""
        axes = [[{"link": link} for link in self.links],
                [{"cut": c, **({} if b is None else {"bottleneck": b})} for c, b in self.cuts],
                [{"codec": c} for c in self.codecs], *([{name: v} for v in values] for name, values in self.axes),
                *([{f"attack.{key}": v} for v in values] for key, values in self.attack_axes)]
        points = []
        for combo in itertools.product(*(axis for axis in axes if axis)):
            for name, defense in self.defenses.items():
                for seed in [{"seed": s} for s in self.seeds] or [{}]:
                    chosen = {k: v for value in (*combo, seed) for k, v in value.items()}
                    link = chosen.pop("link", DIRECT)
                    edge_chosen = {k: v for k, v in chosen.items() if not k.startswith("attack.")}
                    attack_chosen = {k.removeprefix("attack."): v for k, v in chosen.items() if k not in edge_chosen}
                    merged = {**self.model, **defense, **edge_chosen}
                    edge = {k: v for k, v in merged.items() if v != _edge_action(k).default}
                    attack = _attacker_settings(edge, {**self.attack, **attack_chosen})
                    points.append(Point(name, tuple(sorted(edge.items())), tuple(sorted(attack.items())),
                                        self.attacks, self.attack_args, tuple(chosen.items()), link,
                                        self.latency_images, self._base(edge_chosen),
                                        tuple((v, tuple(sorted({**attack, **s}.items())))
                                              for v, s in self.variants.items()), self.per_class))
        keys = [p.key for p in points]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"[grid]: these points come out twice (a value listed twice?): {twice}")
        return points

    def _base(self, chosen: dict) -> Base | None:
        """The base a point with these axis values continues: [model], then [base], then the point's
        own values of what fixes the model, its data and its seed (SHARED_WITH_BASE)."""
        if not self.base:
            return None
        merged = {**self.model, **self.base, **{k: v for k, v in chosen.items() if k in SHARED_WITH_BASE}}
        return Base(tuple(sorted((k, v) for k, v in merged.items() if v != _edge_action(k).default)))

    @property
    def scored(self) -> tuple[str, ...]:
        """The names under which a row holds attack scores: each method, and each method with each
        variant of the attacker (`<method>_<variant>`)."""
        return (*self.attacks, *(f"{m}_{v}" for m in self.attacks for v in self.variants))

    def scorer_data(self) -> dict:
        """The [model] table's dataset settings (see `_scorer_data`)."""
        return _scorer_data(self.model)

    def attacker_settings(self) -> dict:
        """The [attack] table's attacker settings on the [model] table's data (see `_attacker_settings`)."""
        return _attacker_settings(self.model, self.attack)


def check_points(points: list[Point]) -> None:
    """Each point's settings through edge-client's own checks (a cut of its arch, a CEM weight for
    CEM, a schedule it can parse ...): a point edge-client would refuse fails as the sweep starts,
    not after the points before it have run for hours."""
    from edge_client.cli import config_from_args

    parser = _edge_parser()
    for point in points:
        for what, settings in (("point", point.edge), ("the base of point", point.base.edge if point.base else None)):
            try:
                if settings is not None:
                    config_from_args(parser.parse_args(_flags(dict(settings))), parser)
            except ValueError as err:
                raise ValueError(f"{what} {point.key}: edge-client would refuse its settings: {err}") from None


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


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in its folder: a reader (or a resumed sweep)
    sees the old file or the new one, never half of one, whenever the writer is killed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PointFailed(RuntimeError):
    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


def _python(log_path: Path, *args: str, timeout: float) -> None:
    """`python -m *args`, its output into `log_path`; a failure names the process and its last words."""
    name = f"attacker {args[1]}" if args[0] == "attacks" else args[0].replace("_", "-")
    with open(log_path, "w") as out:
        try:
            done = subprocess.run([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            raise PointFailed(f"{name} ran past the point's timeout_s of {timeout:g} s", log_path) from None
    if done.returncode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        raise PointFailed(f"{name} exited {done.returncode}: {lines[-1] if lines else '(no output)'}", log_path)


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


def run_point(config: SweepConfig, point: Point, proxy: str, capture: str, out: Path, log_dir: str = "") -> dict:
    """One point: train and serve through the proxy, attack the capture, score; returns the row.
    With `log_dir`, the point is TensorBoard run `log_dir/KEY`: the edge's and attackers' scalars,
    and the row as HParams."""
    out.mkdir(parents=True, exist_ok=True)
    track = ["--log-dir", str(Path(log_dir) / point.key)] if log_dir else []
    edge_settings = dict(point.edge)
    base = read_base(out.parent.parent, point.base) if point.base else None
    init = ["--init-from", base["encoder"], "--init-job", base["job"]] if base else []
    link = None if point.link == DIRECT else start_process(
        ["deploy.link", "--upstream", proxy, "--profile", point.link, "--seed", str(point.setting("seed"))],
        r"listening on (\S+) ->")
    try:
        server = link.address if link else proxy
        _train_edge(config, out, ["--server", server, "--report", str(out / "edge.json"), "--save-encoder",
                                  str(out / "encoder.pt"), "--no-progress", *track, *_flags(edge_settings), *init])
        if point.latency_images:  # a session of its own: the attacker, which reads the training session, skips it
            _python(out / "edge-client-infer.log", "edge_client", "--infer-only", "--server", server, "--encoder",
                    str(out / "encoder.pt"), "--max-images", str(point.latency_images), "--report",
                    str(out / "latency.json"), *_flags({**_scorer_data(edge_settings), "codec": point.setting("codec")}),
                    timeout=config.timeout_s)
    finally:
        if link:
            link.stop()
    edge = json.loads((out / "edge.json").read_text())
    latency = json.loads((out / "latency.json").read_text()) if point.latency_images else {}
    row: dict = {"key": point.key, "group": point.identity(seed=False), "cut": edge["cut"],
                 "bottleneck": edge["bottleneck"], "codec": point.setting("codec"), "defense": point.defense,
                 "seed": point.setting("seed"), "link": point.link,
                 "axes": {k: v for k, v in point.axes if k not in ("cut", "codec", "seed")},
                 **{k: edge.get(k) for k in METRICS}, **{k: latency.get(k) for k in LATENCY_METRICS},
                 "wall_seconds": edge["wall_seconds"], "epoch_seconds": [h["seconds"] for h in edge["history"]],
                 "epoch_train_accuracy": [h["train_accuracy"] for h in edge["history"]],
                 "defense_settings": edge["defense"], "settings": edge_settings,
                 "attack_settings": dict(point.attack), "history": edge["history"],
                 **({"base": {k: base[k] for k in ("key", "job", "test_accuracy", "settings")}} if base else {})}
    row["time_to_accuracy_s"] = time_to_accuracy(row, config.target_accuracy)
    sample = ["--per-class", str(point.per_class), "--grid", "20"] if point.per_class else []
    for method in point.methods:
        for variant, settings in (("", point.attack), *point.variants):
            name = f"{method}_{variant}" if variant else method
            recon, scored = out / f"recon-{name}", out / f"attack-{name}"
            attack_flags = [flag for key, value in settings for flag in (ATTACK_FLAGS[key], str(value))]
            _python(out / f"attacker-run-{name}.log", "attacks", "run", "--capture", capture, "--session",
                    edge["session_id"], "--method", method, "--encoder", str(out / "encoder.pt"), "--seed",
                    str(point.setting("seed")), "--out", str(recon), *track, *attack_flags, *point.attack_args,
                    timeout=config.timeout_s)
            _python(out / f"attacker-score-{name}.log", "attacks", "score", "--recon", str(recon), "--edge-report",
                    str(out / "edge.json"), "--out", str(scored), *_flags(_scorer_data(edge_settings)), *sample,
                    timeout=config.timeout_s)
            scores = json.loads((scored / "attack.json").read_text())
            row.update({f"{name}_{m}": scores[m] for m in ATTACK_METRICS})
            if "sample" in scores:
                row["scored_sample"] = scores["sample"]
            row[f"{name}_attacker"] = json.loads((recon / "run.json").read_text())  # what produced the scores
            row[f"{name}_grid"] = str((scored / "recon.png").relative_to(out.parent.parent))
    write_atomic(out / "result.json", json.dumps(row, indent=2) + "\n")
    if log_dir:  # accuracy and the attacks' scores first: TensorBoard's HParams table shows five metrics at first
        order = ("test_accuracy", *metric_names(config)[len(METRICS):], *METRICS)
        tracking.write_point(log_dir, point.key, {k: row[k] for k in POINT_SETTINGS}, {m: row.get(m) for m in order})
    return row


def _train_edge(config: SweepConfig, out: Path, flags: list[str]) -> None:
    """The point's edge-client, resumable: it keeps its state in `out/state` every STATE_EVERY steps
    (each time after the server checkpointed its job), so a point whose sweep was killed carries
    on from there when the sweep runs again, in the job it trained in (`out/attempt.json`), and
    ends as it would have uninterrupted. A resume that fails (the server's checkpoint of the job
    is gone or behind the state) starts the point over, in a fresh job: a retried point never
    trains against a decoder an interrupted attempt left half-trained."""
    state, attempt_file = out / "state", out / "attempt.json"
    resuming = attempt_file.exists() and any(state.glob("*.ckpt"))
    for fresh in ([False, True] if resuming else [True]):
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
            write_atomic(attempt_file, json.dumps({"job": f"{out.name}-{uuid.uuid4().hex[:6]}"}) + "\n")
        job = json.loads(attempt_file.read_text())["job"]
        try:
            _python(out / "edge-client.log", "edge_client", "--job", job, "--state-dir", str(state), "--state-every",
                    str(STATE_EVERY), *([] if fresh else ["--resume"]), *flags, timeout=config.timeout_s)
            return
        except PointFailed as err:
            if fresh:
                raise
            shutil.copy(out / "edge-client.log", out / "edge-client-resume.log")  # why, for the curious
            log.warning("%s: the interrupted run could not be resumed (%s; log: edge-client-resume.log); starting "
                        "the point over", out.name, err)


def read_base(out: Path, base: Base) -> dict:
    """A finished base's record (`bases/KEY/base.json`): `key`, `job` (its job on the sweep's server,
    whose checkpoint is `jobs/CHECKPOINT`), `checkpoint`, `encoder` (its encoder file),
    `test_accuracy`, `settings`."""
    return json.loads((out / "bases" / base.key / "base.json").read_text())


def base_ready(out: Path, base: Base) -> bool:
    """Whether `base` was trained and both its halves are still there (the encoder file and the
    decoder's checkpoint: a results folder carried to another machine holds neither)."""
    if not (out / "bases" / base.key / "base.json").exists():
        return False
    record = read_base(out, base)
    return Path(record["encoder"]).exists() and (out / "jobs" / record["checkpoint"]).exists()


def run_base(config: SweepConfig, base: Base, server: str, out: Path) -> dict:
    """Phase A: train `base` straight to the server (nothing of it is attacked, so not through the
    proxy); the edge's Flush makes its decoder's checkpoint durable before `base.json` says it is done."""
    from cloud_server.checkpoints import file_stem

    folder = out / "bases" / base.key
    folder.mkdir(parents=True, exist_ok=True)
    _train_edge(config, folder, ["--server", server, "--report", str(folder / "edge.json"), "--save-encoder",
                                 str(folder / "encoder.pt"), "--no-progress", *_flags(dict(base.edge))])
    edge = json.loads((folder / "edge.json").read_text())
    job = edge["job"]
    if not edge["durable"]:
        raise PointFailed(f"base {base.key}: the server did not checkpoint its decoder", folder / "edge-client.log")
    record = {"key": base.key, "job": job, "checkpoint": f"{file_stem(job)}.ckpt", "encoder": str(folder / "encoder.pt"),
              "test_accuracy": edge["test_accuracy"], "settings": dict(base.edge), "history": edge["history"],
              "wall_seconds": edge["wall_seconds"]}
    write_atomic(folder / "base.json", json.dumps(record, indent=2) + "\n")
    return record


def time_to_accuracy(row: dict, target: float) -> float | None:
    """Training seconds until the end of the first epoch whose training accuracy (the cloud's count
    over the epoch's batches) reached `target`; None if none did. Training accuracy, because
    evaluating the test set after every epoch would send it through the link and the attacker's
    capture as well."""
    elapsed = 0.0
    for seconds, accuracy in zip(row["epoch_seconds"], row["epoch_train_accuracy"]):
        elapsed += seconds
        if accuracy >= target:
            return elapsed
    return None


def attempt(work: Callable[..., dict], *args, out: Path) -> dict:
    """`work(*args)` (`run_point`, `run_base`), whose failure comes back as {"error": message, "log":
    path} instead of raising: a sweep that keeps going records it, and a Ray task's failure needs no
    unwrapping."""
    try:
        return work(*args)
    except PointFailed as err:
        return {"error": str(err), "log": str(err.log_path)}
    except Exception as err:  # a missing or unreadable output of a process that said it succeeded
        log.exception("%s", out.name)
        return {"error": f"{type(err).__name__}: {err}", "log": str(out)}


def metric_names(config: SweepConfig) -> list[str]:
    """A row's measured numbers (the rest of it is the point's settings)."""
    return list(METRICS) + [f"{m}_{k}" for m in config.scored for k in ATTACK_METRICS]


def aggregate(config: SweepConfig, rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every numeric metric, one row per group of points alike in all but the seed."""
    numeric = metric_names(config)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if "epoch_seconds" in row:  # the current target (a point's result.json holds the one of its run)
            row = {**row, "time_to_accuracy_s": time_to_accuracy(row, config.target_accuracy)}
        groups.setdefault(row["group"], []).append(row)
    out = []
    for members in groups.values():
        first = members[0]
        agg: dict = {**{k: first[k] for k in ("cut", "bottleneck", "codec", "defense")},
                     "link": first.get("link", DIRECT)}
        axes = {k: v for k, v in first.get("axes", {}).items() if k != "bottleneck"}
        agg.update({**axes, "axes": " ".join(f"{k}={v}" for k, v in axes.items()), "seeds": len(members)})
        for key in numeric:
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                agg[key] = statistics.fmean(values)
                agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        agg["grid"] = first.get(f"{config.attacks[0]}_grid") if config.attacks else None
        out.append(agg)
    return out


def write_results(config: SweepConfig, rows: list[dict], out: Path) -> list[dict]:
    table = aggregate(config, rows)
    gains = cem_gains(rows, config.scored)
    write_atomic(out / "results.json", json.dumps({"rows": table, "points": rows, "cem_gains": gains}, indent=2)
                 + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
    writer.writeheader()
    writer.writerows(table)
    write_atomic(out / "results.csv", text.getvalue())
    return table


class Services:
    """The sweep's long-lived processes: one cloud-server and the eavesdropping proxy in front of it."""

    def __init__(self, out: Path, jobs: int) -> None:
        """The server keeps its jobs in `out/jobs`: where the bases' decoders wait for the points of
        later runs, and where an interrupted point's job resumes from (see `_train_edge`)."""
        self.capture = str(out / "capture")
        # Every point is a job of its own, kept until the sweep ends: room for all of them.
        self.server: ServerProcess = start_server("--max-jobs", str(max(jobs, 1)), "--checkpoint-dir", str(out / "jobs"))
        try:
            self.proxy = start_process(["attacks", "proxy", "--listen", "127.0.0.1:0", "--upstream",
                                        self.server.address, "--capture", self.capture], r"listening on (\S+) ->")
        except Exception:
            self.server.stop()
            raise

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


class SweepFailed(RuntimeError):
    """Points that failed (key -> {"error": message, "log": path}), and the rows of those that finished."""

    def __init__(self, failures: dict[str, dict], rows: list[dict]) -> None:
        super().__init__(f"{len(failures)} point(s) failed: " + "; ".join(
            f"{key}: {f['error']} (log: {f['log']})" for key, f in failures.items()))
        self.failures, self.rows = failures, rows


def add_log_dir_arg(p) -> None:
    """`--log-dir` of the commands that run a sweep (split-sweep, split-demo)."""
    p.add_argument("--log-dir", default="", metavar="DIR",
                   help="write TensorBoard event files here: one run per point (its edge's and attackers' scalars, "
                        "its settings and final metrics as HParams) ('track' extra)")


def run_sweep(config: SweepConfig, out: Path, progress: bool = True, keep_going: bool = False,
              log_dir: str = "", results: Path | None = None) -> list[dict]:
    """Run the points without a result (in `out/points/KEY/result.json` or `results/KEY.json`), their
    bases first (a two-phase sweep), and return every finished point's row, in grid order; with
    `results`, every finished point's result is kept there too.

    A failure stops the sweep, or with `keep_going` is recorded while the other points run;
    either way the failures go to `failed.json` and `SweepFailed` is raised, naming them."""
    points = config.points()
    check_points(points)
    out.mkdir(parents=True, exist_ok=True)
    done = {row["key"] for row in finished_rows(points, out, results)}
    todo = [p for p in points if p.key not in done]
    log.info("%d points, %d already done", len(points), len(points) - len(todo))
    failures: dict[str, dict] = {}
    if todo:
        bases = list(dict.fromkeys(p.base for p in todo if p.base and not base_ready(out, p.base)))
        services = Services(out, jobs=4 * (len(todo) + len(bases)))
        try:
            if bases:
                log.info("phase A: %d base(s) to train", len(bases))
                failures = _run_all(config, {b.key: functools.partial(
                    attempt, run_base, config, b, services.server.address, out, out=out / "bases" / b.key)
                    for b in bases}, progress, keep_going, "bases")
                for point in todo:
                    if point.base and point.base.key in failures:
                        failures[point.key] = {"error": f"its base {point.base.key} failed", "log":
                                               failures[point.base.key]["log"]}
            if not failures or keep_going:
                runnable = {p.key: p for p in todo if p.key not in failures}
                kept = (lambda key: keep_results(finished_rows([runnable[key]], out), results)) if results else None
                failures |= _run_all(config, {key: functools.partial(
                    attempt, run_point, config, p, services.proxy.address, services.capture, out / "points" / key,
                    log_dir, out=out / "points" / key) for key, p in runnable.items()}, progress, keep_going, "sweep",
                    kept)
        finally:
            services.stop()
    rows = finished_rows(points, out, results)
    if results is not None:
        keep_results(rows, results)
    if failures:
        write_atomic(out / "failed.json", json.dumps(failures, indent=2) + "\n")
        raise SweepFailed(failures, rows)
    (out / "failed.json").unlink(missing_ok=True)  # an earlier run's failures, now done
    return rows


def finished_rows(points: list[Point], out: Path, results: Path | None = None) -> list[dict]:
    """The rows of the points that have a result, in grid order: `out/points/KEY/result.json`, or
    else (a study resumed elsewhere from its kept results) `results/KEY.json`."""
    rows = []
    for point in points:
        for path in (out / "points" / point.key / "result.json", *([results / f"{point.key}.json"] if results else [])):
            if path.exists():
                rows.append(json.loads(path.read_text()))
                break
    return rows


def keep_results(rows: list[dict], results: Path) -> None:
    """Each finished point's row as `results/KEY.json`: settings, hash, metrics, histories, and the
    attackers' settings and loss curves; no images, no checkpoints (what a study keeps in version
    control, to resume elsewhere or rebuild its tables with --report-only)."""
    results.mkdir(parents=True, exist_ok=True)
    for row in rows:
        text = json.dumps(row, indent=2) + "\n"
        path = results / f"{row['key']}.json"
        if not path.exists() or path.read_text() != text:
            write_atomic(path, text)


def _run_all(config: SweepConfig, work: dict[str, Callable[[], dict]], progress: bool, keep_going: bool,
             desc: str, done: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run each of `work` (key -> a call of `attempt`), `config.workers` at a time, calling `done`
    with the key of each that succeeds (a point's result is kept at once: a study stopped
    midway keeps what finished); returns the failures."""
    bar = tqdm(total=len(work), desc=desc, unit="run", disable=not progress)
    start = time.monotonic()
    failures: dict[str, dict] = {}

    def finished(key: str, result: dict) -> bool:
        """Log the run's end; whether the sweep goes on."""
        bar.update(1)
        if "error" in result:
            failures[key] = result
            log.error("%s failed: %s (log: %s)", key, result["error"], result["log"])
            return keep_going
        log.info("%s done (%.0f s elapsed)", key, time.monotonic() - start)
        if done:
            done(key)
        return True

    if config.workers <= 1:
        for key, call in work.items():
            if not finished(key, call()):
                break
    else:
        from deploy.sim.config import ray_environment

        os.environ.update(ray_environment(local=True))  # the cluster started here inherits it
        import ray

        ray.init(num_cpus=config.workers, include_dashboard=False)
        try:
            task = ray.remote(num_cpus=1)(_call)
            pending = {task.remote(call): key for key, call in work.items()}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                if not finished(pending.pop(done[0]), ray.get(done[0])):
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    break
        finally:
            ray.shutdown()
    bar.close()
    return failures


def _call(work: Callable[[], dict]) -> dict:
    """A Ray task's body: the work it was handed (a partial of `attempt`, which travels by reference)."""
    return work()


def _report(config: SweepConfig, rows: list[dict], out: Path) -> None:
    """results.json / results.csv, report.md and its plots, from these rows."""
    from deploy.experiments.plots import write_report

    out.mkdir(parents=True, exist_ok=True)
    write_report(config, write_results(config, rows, out), out, gains=cem_gains(rows, config.scored))


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
    # As deploy.experiments.sweep, not __main__: Ray ships what a task needs from __main__ by value, and a
    # cached function (the parsers) cannot travel so; a module's names travel by reference.
    from deploy.experiments.sweep import main as module_main

    sys.exit(module_main())
