"""A sweep's configuration: the TOML (format in `deploy/experiments/sweep.py`, `split-sweep`'s
help) checked and resolved into its points, each named by what shapes its result.

Every setting is checked as the flag it becomes: a [model] key is an `edge-client` flag,
read by edge-client's own parser, and an [attack] key an `attacker run` flag, read by the
attacker's; a point edge-client would refuse fails here, before the sweep runs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from deploy.link_profiles import DIRECT, PROFILES
from splitnet.cli_util import StrictParser, config_setting

# [attack] settings -> `attacker run` flags. Unset ones are left to the attacker, which
# resolves them by the data (attacks.config.default_inverse) and records them in run.json.
ATTACK_FLAGS = {"epochs": "--inverse-epochs", "blocks": "--inverse-blocks", "width": "--inverse-width",
                "rmle_iterations": "--rmle-iterations", "rmle_lr": "--rmle-lr",
                "rmle_tv_weight": "--rmle-tv-weight", "aux_dataset": "--aux-dataset",
                "aux_data_root": "--aux-data-root", "aux_limit": "--aux-limit"}
SECTIONS = ("model", "base", "grid", "defenses", "attack", "hijack", "run")
# Where data lives on this machine: not part of what a point is, so that a study's kept results
# name the same points on a machine that holds the data elsewhere.
WHERE = frozenset({"data_root", "aux_data_root", "public_root"})
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
# The [grid] axis of the cloud a point trains against: not an edge-client setting but which server
# (cloud_server.config.HIJACKS; "none": the sweep's honest one), with the [hijack] table's settings.
HIJACK = "hijack"
NO_HIJACK = "none"
# [hijack] keys: the hijacking cloud-server's own settings (its flags without the dashes) and their types
HIJACK_KEYS = {"public_data": str, "public_root": str, "public_split": str, "public_image_size": int,
               "hijack_record_every": int}




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


def scorer_data_of(edge: dict) -> dict:
    """The edge's dataset settings, which the scorer needs to rebuild the private images."""
    return {"dataset": edge.get("dataset") or "digits",
            **{k: edge[k] for k in ("data_root", "image_size") if edge.get(k)}}


def _attacker_settings(edge: dict, attack: dict) -> dict:
    """`attacker run` settings: `attack`'s, with auxiliary data of the edge's own dataset unless
    it names other: attacking an RGB edge with digits fails on the channel count, and an attacker
    that never saw the edge's kind of images understates the leak."""
    data = scorer_data_of(edge)
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
    hijack: str = NO_HIJACK  # the cloud it trains against: NO_HIJACK, the sweep's honest one, or a hijacking one
    hijack_settings: tuple[tuple[str, object], ...] = ()  # that server's resolved [hijack] settings, sorted

    def setting(self, name: str):
        """An edge-client setting of this point, its default where the point does not set it."""
        return dict(self.edge).get(name, _edge_action(name).default)

    def identity(self, seed: bool = True) -> str:
        """A hash of everything that shapes the point's result (with `seed=False`: its group over seeds)."""
        edge = {k: v for k, v in _placeless(self.edge).items() if seed or k != "seed"}
        # link, latency, hijack ... only where set: the points of sweeps older than them keep their names
        measured = {**({"link": self.link} if self.link != DIRECT else {}),
                    **({"latency_images": self.latency_images} if self.latency_images else {}),
                    **({"base": self.base.identity if seed else self.base.identity_over_seeds} if self.base else {}),
                    **({"variants": [[name, _placeless(s)] for name, s in self.variants]} if self.variants else {}),
                    **({"per_class": self.per_class} if self.per_class else {}),
                    **({"hijack": {"method": self.hijack, **_placeless(self.hijack_settings)}}
                       if self.hijack != NO_HIJACK else {})}
        return _digest({"edge": edge, "attack": _placeless(self.attack), "methods": list(self.methods),
                        "attack_args": list(self.attack_args), **measured})

    @property
    def key(self) -> str:
        axes = dict(self.axes)
        cut = (self.setting("cut") or "default") + (f"-b{axes['bottleneck']}" if "bottleneck" in axes else "")
        others = [f"{name}={_label(value)}" for name, value in self.axes
                  if name not in ("cut", "bottleneck", "codec", "seed")]
        link = [f"link={self.link}"] if self.link != DIRECT else []
        hijack = [f"hijack={self.hijack}"] if self.hijack != NO_HIJACK else []
        return "__".join([cut, self.setting("codec"), _label(self.defense), *others, *link, *hijack,
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
    def identity_over_seeds(self) -> str:
        """What the points continuing this base at every seed share (each seed has a base of its own,
        so a point's group over seeds names its bases without their seed)."""
        return _digest({k: v for k, v in _placeless(self.edge).items() if k != "seed"})

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
    hijacks: tuple[str, ...] = ()  # [grid] hijack: the cloud of each point (HIJACKS); empty: not an axis (honest)
    hijack: dict = field(default_factory=dict)  # [hijack]: the hijacking server's settings (HIJACK_KEYS)

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
        from cloud_server.config import HIJACKS

        for hijack in self.hijacks:
            if hijack not in HIJACKS:
                raise ValueError(f"[grid] hijack: unknown value {hijack!r}; valid: {', '.join(HIJACKS)} (none: an "
                                 "honest server)")
        set_("hijacks", tuple(self.hijacks))
        for key, value in _table("[hijack]", self.hijack).items():
            if key not in HIJACK_KEYS:
                raise ValueError(f"[hijack]: unknown key {key!r}; valid keys: {', '.join(HIJACK_KEYS)}")
            kind = HIJACK_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"[hijack] {key}: expected {'an integer' if kind is int else 'a string'}, "
                                 f"got {value!r}")
        if self.hijack and not self.hijacked:
            raise ValueError("[hijack]: settings of a hijacking server, but no point trains against one "
                             "([grid] hijack = [\"none\", \"fsha\"])")
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
        named = {plural: _values(f"[grid] {plural}", grid.pop(plural)) for plural in (*NAMED_AXES, LINKS, HIJACK)
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
                   attack=attack, attack_axes=tuple(attack_grid.items()), links=tuple(named.get(LINKS, [])),
                   hijacks=tuple(named.get(HIJACK, [])), hijack=d.get("hijack", {}), **run)

    def points(self) -> list[Point]:
        """Every combination of the axes and the defenses, resolved into its settings; seeds
        vary fastest, so the seeds of one setting run one after another."""
        axes = [[{"link": link} for link in self.links], [{HIJACK: h} for h in self.hijacks],
                [{"cut": c, **({} if b is None else {"bottleneck": b})} for c, b in self.cuts],
                [{"codec": c} for c in self.codecs], *([{name: v} for v in values] for name, values in self.axes),
                *([{f"attack.{key}": v} for v in values] for key, values in self.attack_axes)]
        points = []
        for combo in itertools.product(*(axis for axis in axes if axis)):
            for name, defense in self.defenses.items():
                for seed in [{"seed": s} for s in self.seeds] or [{}]:
                    chosen = {k: v for value in (*combo, seed) for k, v in value.items()}
                    link = chosen.pop("link", DIRECT)
                    hijack = chosen.pop(HIJACK, NO_HIJACK)
                    edge_chosen = {k: v for k, v in chosen.items() if not k.startswith("attack.")}
                    attack_chosen = {k.removeprefix("attack."): v for k, v in chosen.items() if k not in edge_chosen}
                    merged = {**self.model, **defense, **edge_chosen}
                    edge = {k: v for k, v in merged.items() if v != _edge_action(k).default}
                    attack = _attacker_settings(edge, {**self.attack, **attack_chosen})
                    points.append(Point(name, tuple(sorted(edge.items())), tuple(sorted(attack.items())),
                                        self.attacks, self.attack_args, tuple(chosen.items()), link,
                                        self.latency_images, self._base(edge_chosen),
                                        tuple((v, tuple(sorted({**attack, **s}.items())))
                                              for v, s in self.variants.items()), self.per_class,
                                        hijack, self._hijack_settings(hijack, edge)))
        keys = [p.key for p in points]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"[grid]: these points come out twice (a value listed twice?): {twice}")
        return points

    def _hijack_settings(self, hijack: str, edge: dict) -> tuple[tuple[str, object], ...]:
        """The hijacking server's settings for a point with these edge settings: [hijack]'s, and where it
        leaves them out, the test split of the edge's own dataset (its root and image size): images of
        the edge's kind, disjoint from the training split the edge trains on. Checked by the server's
        own config."""
        if hijack == NO_HIJACK:
            return ()
        from cloud_server.config import ServerConfig
        from splitnet.settings import InvalidSetting

        data = scorer_data_of(edge)
        public = self.hijack.get("public_data", data["dataset"])
        same = {"public_root": data.get("data_root", ""), "public_image_size": data.get("image_size", 0)}
        settings = {"public_data": public, "public_split": "test",
                    "hijack_record_every": ServerConfig.hijack_record_every,
                    **(same if public == data["dataset"] else {}), **self.hijack}
        try:
            ServerConfig(hijack=hijack, **settings)
        except InvalidSetting as err:
            raise ValueError(f"[hijack]: {err.message(lambda name: name)}") from None
        if edge.get("head_cut"):
            raise ValueError("[grid] hijack: the hijacking cloud runs the vanilla split only; a point with "
                             f"head_cut = {edge['head_cut']!r} cannot train against it")
        return tuple(sorted((k, v) for k, v in settings.items() if v not in ("", 0) or k == "public_data"))

    def _base(self, chosen: dict) -> Base | None:
        """The base a point with these axis values continues: [model], then [base], then the point's
        own values of what fixes the model, its data and its seed (SHARED_WITH_BASE)."""
        if not self.base:
            return None
        merged = {**self.model, **self.base, **{k: v for k, v in chosen.items() if k in SHARED_WITH_BASE}}
        return Base(tuple(sorted((k, v) for k, v in merged.items() if v != _edge_action(k).default)))

    @property
    def hijacked(self) -> bool:
        """Whether some point trains against a hijacking server."""
        return any(h != NO_HIJACK for h in self.hijacks)

    @property
    def detects(self) -> bool:
        """Whether some point's edge runs a hijacking detector (edge-client --detect)."""
        values = [self.model.get("detect"), *(d.get("detect") for d in self.defenses.values()),
                  *(v for name, values in self.axes if name == "detect" for v in values)]
        return any(v not in (None, "none") for v in values)

    @property
    def scored(self) -> tuple[str, ...]:
        """The names under which a row holds attack scores: each method, and each method with each
        variant of the attacker (`<method>_<variant>`)."""
        return (*self.attacks, *(f"{m}_{v}" for m in self.attacks for v in self.variants))

    def scorer_data(self) -> dict:
        """The [model] table's dataset settings (see `scorer_data_of`)."""
        return scorer_data_of(self.model)

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
                    config_from_args(parser.parse_args(as_flags(dict(settings))), parser)
            except ValueError as err:
                raise ValueError(f"{what} {point.key}: edge-client would refuse its settings: {err}") from None


def as_flags(settings: dict) -> list[str]:
    """{"noise": 0.1, "freeze_gates": True} -> ["--noise", "0.1", "--freeze-gates"]"""
    out: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def with_absolute_roots(config: SweepConfig, data_root: str = "") -> SweepConfig:
    """`data_root` (if given) as the edge's data root, and every data root absolute: relative ones
    are taken from where split-sweep was started, whatever folder a Ray worker runs in."""
    model = {**config.model, **({"data_root": data_root} if data_root else {})}
    attack, hijack = dict(config.attack), dict(config.hijack)
    for table in (model, attack, hijack):
        for key in ("data_root", "aux_data_root", "public_root"):
            if table.get(key):
                table[key] = str(Path(table[key]).resolve())
    return replace(config, model=model, attack=attack, hijack=hijack)
