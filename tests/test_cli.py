"""The console scripts as a user meets them: `--help` and `--version` without loading torch,
defaults in the help, and `--config FILE.toml` / `--print-config` on the commands that run."""

import subprocess
import sys
import tomllib
from importlib.metadata import distribution
from pathlib import Path

import pytest

from attacks import cli as attacker_cli
from cloud_server import cli as cloud_cli
from deploy.sim import cli as ray_cli
from edge_client import cli as edge_cli
from splitnet import cli_util

SCRIPTS = {ep.name: ep.value.split(":")[0] for ep in distribution(cli_util.DISTRIBUTION).entry_points
           if ep.group == "console_scripts"}
HEAVY = ("torch", "torchvision", "ray", "matplotlib", "tensorboard")


def test_every_script_in_pyproject_is_covered():
    assert set(SCRIPTS) == {"edge-client", "cloud-server", "split-ray", "attacker", "split-sweep", "split-demo", "split-link", "split-plan"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_and_version(script):
    bin_ = Path(sys.executable).parent / script
    help_ = subprocess.run([bin_, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith(f"usage: {script} ") and "--version" in help_.stdout
    assert "(default" in help_.stdout  # defaults show
    version = subprocess.run([bin_, "--version"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"{script} {distribution(cli_util.DISTRIBUTION).version}\n")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_parsing_imports_nothing_heavy(script):
    """The module behind each script, and its --help (the whole parser built), leave torch unloaded:
    the machinery is imported after parsing, so help and usage errors answer at once."""
    code = (f"import contextlib, io, sys\nfrom {SCRIPTS[script]} import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            f"print(sorted(set(sys.modules) & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "imagefolder", "--data-root", "/nowhere/images"], "dataset folder /nowhere/images does not exist"),
    (["--dataset", "cifar10"], "dataset 'cifar10' needs --data-root DIR"),
])
def test_edge_client_refuses_a_missing_dataset_before_importing_torch(argv, needle):
    """A sweep's point or a user's typo in a data root ends in a one-line error at once (exit 2), not after
    the seconds torch takes to import."""
    code = (f"import sys\nfrom edge_client.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as exit_:\n"
            f"    print(exit_.code, sorted(set(sys.modules) & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "2 []\n" and done.stderr.startswith("edge-client: error: ") and needle in done.stderr, done


def test_light_names_match_their_implementations():
    import cem
    from edge_client.config import CEM_CHOICES
    from splitnet import models, settings

    assert settings.ARCHS == models.architectures()
    assert CEM_CHOICES == ("none", *cem.SURROGATES)


def _toml(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _printed(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print-config"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _edge_config(argv: list[str]):
    parser = cli_util.new_parser("edge-client", None)
    edge_cli.add_training_args(parser)
    cli_util.add_config_args(parser)
    return edge_cli.config_from_args(cli_util.parse_args(parser, argv), parser)


def test_config_file_sets_values_and_the_command_line_wins(tmp_path):
    config = _toml(tmp_path, 'epochs = 3\nlambda = 2.5\ncem = "gmm"\nno_progress = true\nlr-schedule = "constant"\n')
    for argv in (["--config", config, "--epochs", "5"], ["--epochs", "5", "--config", config]):
        edge = _edge_config(argv)
        assert (edge.epochs, edge.defense.lam, edge.defense.cem, edge.progress, edge.lr_schedule) == \
            (5, 2.5, "gmm", False, "constant")
    assert _edge_config(["--config", config]).epochs == 3


def test_config_file_fills_required_flags_of_attacker_run(tmp_path, capsys):
    config = _toml(tmp_path, 'capture = "cap"\nout = "recon"\ninverse-epochs = 4\n')
    printed = tomllib.loads(_printed(attacker_cli.main, ["run", "--config", config, "--out", "elsewhere"], capsys))
    assert (printed["capture"], printed["out"], printed["inverse-epochs"]) == ("cap", "elsewhere", 4)


@pytest.mark.parametrize("text,needles", [
    ("epoch = 3\n", ["unknown key 'epoch'", "valid keys:", "epochs", "lambda"]),
    ("epochs = 2.5\n", ["epochs: invalid int value: 2.5"]),
    ('codec = "fp8"\n', ["codec: invalid choice 'fp8'"]),
    ("download = 1\n", ["download: expected true or false"]),
    ("epochs = [1, 2]\n", ["epochs: expected one value"]),
    ("epochs = \n", ["not a TOML file"]),
])
def test_config_file_errors_name_the_file_and_key(tmp_path, capsys, text, needles):
    config = _toml(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        edge_cli.main(["--config", config])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"edge-client: error: --config {config}: ") and all(n in last for n in needles), last


def test_server_port_in_a_config_file_goes_through_the_flags_check(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cloud_cli.main(["--config", _toml(tmp_path, "port = 70000\n")])
    assert "port: '70000' is not a port in 0..65535" in capsys.readouterr().err


@pytest.mark.parametrize("main,argv", [
    (edge_cli.main, ["--epochs", "2", "--cem", "slot", "--lambda", "16", "--cut", "block2", "--no-progress"]),
    (cloud_cli.main, ["--port", "0", "--max-jobs", "3", "--idle-timeout", "9.5"]),
    (ray_cli.main, ["--clients", "3", "--mode", "splitfed", "--partition", "dirichlet:0.5", "--width", "0.5"]),
    (ray_cli.main, ["--clients", "300", "--workers", "--fraction", "0.1", "--local-steps", "4"]),
    (attacker_cli.main, ["run", "--capture", "c", "--out", "o", "--method", "rmle", "--rmle-lr", "0.002"]),
])
def test_print_config_round_trips_as_a_config_file(main, argv, tmp_path, capsys):
    printed = _printed(main, argv, capsys)
    command = argv[:1] if main is attacker_cli.main else []
    again = _printed(main, [*command, "--config", _toml(tmp_path, printed)], capsys)
    assert again == printed
    defaults = _printed(main, command + (["--capture", "c", "--out", "o"] if command else []), capsys)
    assert defaults != printed  # the flags did reach the output


def test_print_config_keeps_tokens_out(capsys):
    printed = _printed(cloud_cli.main, ["--auth-token", "s3cret-token-value"], capsys)
    assert "s3cret" not in printed and "# auth-token: given, not printed" in printed


def test_a_repeatable_flag_on_the_command_line_replaces_the_files_list(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLIT_AUTH_TOKEN", raising=False)
    first, second, third = "a" * 32, "b" * 32, "c" * 32
    config = _toml(tmp_path, f'auth-token = ["{first}", "{second}"]\n')
    assert cloud_cli.parse_args(["--config", config])[0].auth_tokens == (first, second)
    assert cloud_cli.parse_args(["--auth-token", third, "--config", config])[0].auth_tokens == (third,)
    later = _toml(tmp_path, f'auth-token = ["{third}"]\n', "later.toml")
    assert cloud_cli.parse_args(["--config", config, "--config", later])[0].auth_tokens == (third,)


def test_a_parser_knows_its_flags_groups_and_subcommands_without_argparse_internals():
    parser = cli_util.new_parser("tool", None)
    group = parser.add_argument_group("g")
    group.add_argument("--lambda", dest="lam", type=float, default=0.0)
    parser.add_argument("--token", dest="tokens", action="append")
    run = parser.add_subparsers(dest="command").add_parser("run")
    run.add_argument("--out", required=True)
    assert set(parser.settings()) == {"lambda", "token"}  # --help and --version are no settings
    assert parser.settings()["lambda"].default == 0.0 and parser.repeated == {"tokens"}
    assert (parser.flag("lam"), parser.flag("defense.lam"), parser.flag("state_every")) == \
        ("--lambda", "--lambda", "--state-every")
    assert parser.subcommand("run") is run and set(run.settings()) == {"out"}
    assert parser.parse_args(["--lambda", "2", "run", "--out", "o"]).lam == 2.0  # the group's flag still parses


def test_a_strict_parser_raises_its_usage_errors():
    parser = cli_util.new_parser("tool", None, cli_util.StrictParser)
    parser.add_subparsers(dest="command").add_parser("run").add_argument("--out", required=True)
    with pytest.raises(ValueError, match="the following arguments are required: --out"):
        parser.parse_args(["run"])  # a subcommand's parser is strict too
    with pytest.raises(ValueError, match="invalid choice: 'walk'"):
        parser.parse_args(["walk"])


def test_list_cuts_prints_the_model_registry(capsys):
    from splitnet import models

    assert edge_cli.main(["--list-cuts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(models.architectures())
    assert lines[0] == "cnn: conv1 block1 block2 (default block1)"
