"""Pieces every command line shares: its parser, `--config` files, logging, threads.

Imports nothing heavy (no torch, no Ray): a parser is built from this and the light
config modules, and each command imports its machinery only after parsing, so `--help`,
`--version` and a usage error answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from splitnet import wire

DISTRIBUTION = "splitnet-under-attack"
# Settings --print-config names but does not print: the output is meant to be saved and shared.
SECRET_FLAGS = ("--auth-token",)
_NOT_SETTINGS = ("help", "version", "config", "print_config")
# Modules that only an extra of pyproject.toml installs, by top-level name: a plain install is
# an edge device's, and a command that reaches one of them says which extra to add.
EXTRA_OF_MODULE = {"grpc_health": "cloud", "grpc_reflection": "cloud", "sklearn": "data", "torchvision": "data",
                   "torchmetrics": "attack", "PIL": "attack", "ray": "sim", "matplotlib": "plot",
                   "tensorboard": "track"}


def names_missing_extra(prog: str):
    """Decorate a command's `main` so that a module its install lacks is a one-line error naming
    the extra that brings it (exit 2), not a traceback; any other import error stays one."""
    def decorate(main):
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except ModuleNotFoundError as err:
                module = (err.name or "").split(".")[0]
                if module not in EXTRA_OF_MODULE:
                    raise
                extra = EXTRA_OF_MODULE[module]
                print(f"{prog}: error: {module} is not installed; it comes with the {extra!r} extra: "
                      f"pip install '{DISTRIBUTION}[{extra}]'", file=sys.stderr)
                return 2
        return wrapped
    return decorate


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("SPLIT_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads.

    Edge and cloud often share a machine (demo, tests, CI): two processes each running
    torch's default of one thread per core made a step 14x slower on 2 cores
    (783 ms vs 55 ms), so both CLIs default to 1 and take --threads to raise it.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """The `--threads` flag every process of the project takes (see `set_threads`)."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default %(default)s; 0: torch's default of one per core)")


def port(text: str) -> int:
    """argparse type of a port to listen on: 0 (any free one) .. 65535; argparse names the flag."""
    if not text.isdigit() or int(text) > wire.MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 0..{wire.MAX_PORT}")
    return int(text)


def listen_address(text: str) -> str:
    """argparse type of a HOST:PORT to listen on (port 0: any free one)."""
    try:
        wire.parse_address(text, listen=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps each description's own line breaks and shows every flag's default.

    A help text that already speaks of its default (say "default: the arch's") keeps its
    own words; an off switch (False), an unset value (None) or an empty one ("") says nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default in ("", argparse.SUPPRESS)):
            return action.help
        return f"{text} (default %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that knows the flags added to it (through its argument groups too) and
    its subcommands, by public means.

    `--config` files, `--print-config`, the sweep's keys and the messages that name a config
    field's flag need a parser's flags; argparse keeps them in private attributes that change
    between its releases. So every add_argument is recorded here: the parser's own, and its
    groups' (`add_argument_group` hands out a recording view of the group). Subcommand parsers
    made with `add_subparsers().add_parser` are of the parser's own class.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.added: list[argparse.Action] = []  # every flag and positional, in the order added
        self.repeated: set[str] = set()  # the dests of `action="append"` flags
        self.not_settings: set[str] = set(_NOT_SETTINGS)  # dests that are no file keys nor printed settings
        self._subcommands: argparse.Action | None = None
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        return self.record(super().add_argument(*args, **kwargs), kwargs)

    def add_argument_group(self, *args, **kwargs):
        return _RecordingGroup(self, super().add_argument_group(*args, **kwargs))

    def add_subparsers(self, **kwargs):
        self._subcommands = super().add_subparsers(**kwargs)
        return self._subcommands

    def record(self, action: argparse.Action, kwargs: dict) -> argparse.Action:
        """Note `action`, added with `kwargs`; returns it, as add_argument does."""
        self.added.append(action)
        if kwargs.get("action") == "append":
            self.repeated.add(action.dest)
        return action

    def subcommand(self, name: str) -> "Parser":
        """The parser of subcommand `name` (e.g. `attacker run`'s)."""
        if self._subcommands is None:
            raise KeyError(f"{self.prog} has no subcommands")
        return self._subcommands.choices[name]

    def settings(self) -> dict[str, argparse.Action]:
        """Flag name without dashes -> its action, for every flag that holds a setting (aliases too)."""
        return {flag[2:]: action for action in self.added if action.dest not in self.not_settings
                for flag in action.option_strings if flag.startswith("--")}

    def flag(self, field: str) -> str:
        """The first long flag whose dest is config field `field` (a nested one, `defense.lam`, by its
        own name): `lam` -> `--lambda`; a field without a flag here is spelt as one would be,
        `state_every` -> `--state-every`. A command line names its flags in a config's message with this."""
        dest = field.rpartition(".")[2]
        return next((flag for action in self.added if action.dest == dest for flag in action.option_strings
                     if flag.startswith("--")), "--" + dest.replace("_", "-"))


class _RecordingGroup:
    """An argument group whose add_argument also records the flag in its Parser; all else is the
    group's own (argparse itself adds each of the parser's flags through its default groups)."""

    def __init__(self, parser: Parser, group) -> None:
        self._parser, self._group = parser, group

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        return self._parser.record(self._group.add_argument(*args, **kwargs), kwargs)

    def __getattr__(self, name: str):
        return getattr(self._group, name)


class StrictParser(Parser):
    """A Parser whose usage errors raise ValueError (the message alone) instead of exiting: for a
    caller that checks settings through a command's flags and reports them its own way (a sweep)."""

    def error(self, message: str):
        raise ValueError(message)


def new_parser(prog: str, description: str | None, parser_class: type[Parser] = Parser, **kwargs) -> Parser:
    """The parser every console script starts from: its formatter and `--version`."""
    p = parser_class(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
    p.add_argument("--version", action="version", version=f"%(prog)s {version(DISTRIBUTION)}")
    return p


class _Reparse(Exception):
    """Raised by --config once its file is applied: parsing starts over so the command line wins."""


class _ConfigFile(argparse.Action):
    def __call__(self, parser, namespace, path, option_string=None) -> None:
        applied = parser.__dict__.setdefault("_configs_applied", set())
        if path not in applied:
            apply_config_file(parser, path)
            applied.add(path)
            raise _Reparse
        setattr(namespace, self.dest, path)


def add_config_args(parser: Parser) -> None:
    """`--config FILE.toml` and `--print-config` for `parser`'s own flags (see `parse_args`)."""
    parser.add_argument("--config", action=_ConfigFile, metavar="FILE.toml",
                        help="take settings from this TOML file: keys are this command's flag names (dashes or "
                             "underscores), e.g. epochs = 3; flags on the command line win")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as TOML (a file --config reads back) and exit")
    parser.set_defaults(_settings_parser=parser)


def parse_args(parser: Parser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, with the file of a `--config` (on the parser or a subcommand) applied.

    The file's values become the parser's defaults and the command line is parsed again,
    so a flag given there overrides the file. With `--print-config` the resolved settings
    are printed and the process exits 0.
    """
    while True:  # once more per file applied (several --config: the later one wins)
        try:
            args = parser.parse_args(argv)
            break
        except _Reparse:
            continue
    settings_parser = vars(args).pop("_settings_parser", None)
    for action, values in getattr(settings_parser, "_file_lists", {}).values():
        if getattr(args, action.dest) is action.default:  # the flag was not repeated on the command line
            setattr(args, action.dest, values)
    if settings_parser is not None and args.print_config:
        print(settings_toml(settings_parser, args), end="")
        parser.exit(0)
    return args


def apply_config_file(parser: Parser, path: str) -> None:
    """Make the settings in TOML file `path` the defaults of `parser`, each converted and
    checked as its flag's own value would be; a bad file or value is a usage error naming it."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except OSError as err:
        parser.error(f"--config {path}: {err.strerror or err}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        parser.error(f"--config {path}: not a TOML file: {err}")
    defaults = {}
    for key, value in table.items():
        action, value = config_setting(parser, f"--config {path}", key, value)
        if action.dest in parser.repeated:
            # As a default, argparse would add the command line's values to the file's; `parse_args`
            # uses the file's only where the flag is not given.
            parser.__dict__.setdefault("_file_lists", {})[action.dest] = (action, value)
        else:
            defaults[action.dest] = value
        action.required = False
    parser.set_defaults(**defaults)


def config_setting(parser: Parser, where: str, key: str, value) -> tuple[argparse.Action, object]:
    """The flag of file key `key` (its name, dashes or underscores) and `value` converted and checked
    as that flag's own value would be; an unknown key or a bad value is `parser.error` naming `where`."""
    actions = parser.settings()
    action = actions.get(key.replace("_", "-"))
    if action is None:
        parser.error(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(actions))}")
    return action, _file_value(parser, f"{where}: {key}", action, value)


def _file_value(parser: Parser, where: str, action: argparse.Action, value):
    if action.nargs == 0:  # an on/off flag (store_true)
        if not isinstance(value, bool):
            parser.error(f"{where}: expected true or false, got {value!r}")
        return action.const if value else action.default
    repeated = action.dest in parser.repeated
    if repeated != isinstance(value, list):
        parser.error(f"{where}: expected {'a list of values' if repeated else 'one value'}, got {value!r}")
    converted = [_converted(parser, where, action, item) for item in (value if repeated else [value])]
    return converted if repeated else converted[0]


def _converted(parser: Parser, where: str, action: argparse.Action, value):
    """`value` through the flag's own argparse type and choices, as if typed after it."""
    if isinstance(value, (bool, dict, list)):
        parser.error(f"{where}: expected a value as its flag takes one, got {value!r}")
    text = str(value)
    try:
        result = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as err:
        parser.error(f"{where}: {err}")
    except (TypeError, ValueError):
        parser.error(f"{where}: invalid {getattr(action.type, '__name__', 'value')} value: {value!r}")
    if action.choices is not None and result not in action.choices:
        parser.error(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return result


def settings_toml(parser: Parser, args: argparse.Namespace) -> str:
    """`parser`'s settings in `args` as TOML, one key per flag (its first long name)."""
    lines, seen = [], set()
    for key, action in parser.settings().items():
        if action.dest in seen:
            continue
        seen.add(action.dest)
        value = getattr(args, action.dest)
        if value is None:
            lines.append(f"# {key}: not set")
        elif value and f"--{key}" in SECRET_FLAGS:
            lines.append(f"# {key}: given, not printed")
        else:  # an int default of a float flag (64 MiB) prints as what the flag reads back: 64.0
            lines.append(f"{key} = {_toml_value(float(value) if action.type is float else value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string
