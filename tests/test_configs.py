"""The configs check themselves: a bad value given through the Python API is refused as the
command line refuses it, by the config, with the field named; the command lines only spell
the field as their flag (the messages users see, pinned here next to the Python ones)."""

from __future__ import annotations

from functools import partial

import pytest

from cloud_server import cli as cloud_cli
from cloud_server.config import ServerConfig
from edge_client import cli as edge_cli
from edge_client.config import ConnectionConfig, DefenseConfig, EdgeConfig
from splitnet import cli_util, models
from splitnet.settings import InvalidSetting, ObfuscationConfig

STATE_NOTE = "(the server keeps the replies of at most 16 steps after a state, for a resumed edge to get them again)"
EDGE_CASES = [  # (a config made with a bad value, field, the Python API's message, edge-client's)
    (partial(EdgeConfig, epochs=0), "epochs", "EdgeConfig.epochs must be >= 1", "--epochs must be >= 1"),
    (partial(EdgeConfig, batch_size=0), "batch_size", "EdgeConfig.batch_size must be >= 1",
     "--batch-size must be >= 1"),
    (partial(EdgeConfig, bottleneck=-2), "bottleneck", "EdgeConfig.bottleneck must be >= 0",
     "--bottleneck must be >= 0"),
    (partial(EdgeConfig, max_steps=-1), "max_steps", "EdgeConfig.max_steps must be >= 0", "--max-steps must be >= 0"),
    (partial(EdgeConfig, epoch_steps=-1), "epoch_steps", "EdgeConfig.epoch_steps must be >= 0",
     "--epoch-steps must be >= 0"),
    (partial(EdgeConfig, lr=0.0), "lr", "EdgeConfig.lr must be > 0", "--lr must be > 0"),
    (partial(EdgeConfig, lr=float("nan")), "lr", "EdgeConfig.lr must be > 0", "--lr must be > 0"),
    (partial(EdgeConfig, defense=DefenseConfig(cem="gmm")), "defense.lam",
     "EdgeConfig.defense.cem gmm needs a positive CEM weight: pass EdgeConfig.defense.lam "
     "(e.g. EdgeConfig.defense.lam 16)",
     "--cem gmm needs a positive CEM weight: pass --lambda (e.g. --lambda 16)"),
    (partial(EdgeConfig, init_job="default"), "init_job",
     "EdgeConfig.init_job default names this run's own EdgeConfig.job; a continuation trains a new job",
     "--init-job default names this run's own --job; a continuation trains a new job"),
    (partial(EdgeConfig, resume=True), "resume",
     "EdgeConfig.resume needs EdgeConfig.state_dir DIR (where an earlier run wrote its state)",
     "--resume needs --state-dir DIR (where an earlier run wrote its state)"),
    (partial(EdgeConfig, state_every=17), "state_every", f"EdgeConfig.state_every must be 1..16 {STATE_NOTE}",
     f"--state-every must be 1..16 {STATE_NOTE}"),
    (partial(EdgeConfig, lr_schedule="zigzag"), "lr_schedule",
     "EdgeConfig.lr_schedule kind: 'zigzag' is not one of ['constant', 'multistep', 'cosine']",
     "--lr-schedule kind: 'zigzag' is not one of ['constant', 'multistep', 'cosine']"),
    (partial(EdgeConfig, warmup_epochs=11.0), "lr_schedule",
     "EdgeConfig.warmup_epochs: 11.0 must lie in [0, epochs=10]",
     "--warmup-epochs: 11.0 must lie in [0, epochs=10]"),
    (partial(EdgeConfig, arch="alexnet"), "arch",
     "EdgeConfig.arch must be one of ('cnn', 'resnet20', 'vgg11_bn'), got 'alexnet'",
     "--arch must be one of ('cnn', 'resnet20', 'vgg11_bn'), got 'alexnet'"),
    (partial(EdgeConfig, width=8.0), "width", "EdgeConfig.width 8.0 must lie in [0.015625, 4.0]",
     "--width 8.0 must lie in [0.015625, 4.0]"),
    (partial(EdgeConfig, arch="resnet20", cut="block1"), "cut",
     "unknown cut 'block1' for arch 'resnet20'; valid cuts: ['stem', 'layer1', 'layer2', 'layer3']",
     "unknown cut 'block1' for arch 'resnet20'; valid cuts: ['stem', 'layer1', 'layer2', 'layer3']"),
    (partial(ConnectionConfig, pipeline=-1), "pipeline", "ConnectionConfig.pipeline must be >= 0",
     "--pipeline must be >= 0"),
    (partial(DefenseConfig, lam=-1.0), "lam", "DefenseConfig.lam must be a finite number >= 0, got -1.0",
     "--lambda must be a finite number >= 0, got -1.0"),
    (partial(DefenseConfig, noise_kind="cauchy"), "noise_kind",
     "DefenseConfig.noise_kind must be one of ('gaussian', 'laplace'), got 'cauchy'",
     "--noise-kind must be one of ('gaussian', 'laplace'), got 'cauchy'"),
]
SERVER_CASES = [  # (a config made with a bad value, field, the Python API's message, cloud-server's)
    (partial(ServerConfig, checkpoint_every=0), "checkpoint_every", "ServerConfig.checkpoint_every must be >= 1",
     "--checkpoint-every must be >= 1"),
    (partial(ServerConfig, max_message_mb=0.0), "max_message_mb", "ServerConfig.max_message_mb must be > 0",
     "--max-message-mb must be > 0"),
    *((partial(ServerConfig, **{count: 0}), count,
       "ServerConfig.max_jobs, ServerConfig.max_workers, ServerConfig.max_streams and "
       "ServerConfig.max_streams_per_peer must be >= 1",
       "--max-jobs, --max-workers, --max-streams and --max-streams-per-peer must be >= 1")
      for count in ("max_jobs", "max_workers", "max_streams", "max_streams_per_peer")),
    (partial(ServerConfig, idle_timeout_s=0.0), "idle_timeout_s", "ServerConfig.idle_timeout_s must be > 0",
     "--idle-timeout must be > 0"),
    *((partial(ServerConfig, **budget), "job_memory_mb",
       "ServerConfig.job_memory_mb must be > 0 and at most ServerConfig.max_memory_mb",
       "--job-memory-mb must be > 0 and at most --max-memory-mb")
      for budget in ({"job_memory_mb": 0.0}, {"max_memory_mb": 512.0})),
    (partial(ServerConfig, job_idle_s=-1.0), "job_idle_s", "ServerConfig.job_idle_s must be >= 0 (0: never evict)",
     "--job-idle-seconds must be >= 0 (0: never evict)"),
]


def _edge_parser() -> cli_util.Parser:
    parser = cli_util.new_parser("edge-client", None)
    edge_cli.add_training_args(parser)
    return parser


@pytest.mark.parametrize("make, field, python, flags", EDGE_CASES, ids=[case[1] for case in EDGE_CASES])
def test_every_bad_edge_setting_is_refused_by_the_python_api(make, field, python, flags):
    with pytest.raises(InvalidSetting) as err:
        make()
    assert (err.value.field, str(err.value)) == (field, python)
    assert err.value.message(_edge_parser().flag) == flags


@pytest.mark.parametrize("make, field, python, flags", SERVER_CASES, ids=[case[1] for case in SERVER_CASES])
def test_every_bad_server_setting_is_refused_by_the_python_api(make, field, python, flags):
    with pytest.raises(InvalidSetting) as err:
        make()
    assert (err.value.field, str(err.value)) == (field, python)
    assert err.value.message(cloud_cli.build_parser().flag) == flags


def test_the_defaults_and_edge_values_pass():
    EdgeConfig(epochs=1, batch_size=1, max_steps=0, lr=1e-9, state_every=16, resume=True, state_dir="s",
               defense=DefenseConfig(cem="gmm", lam=1e-3), init_job="base", arch="vgg11_bn", cut="pool2", width=4.0)
    ServerConfig(checkpoint_every=1, job_memory_mb=4096.0, max_memory_mb=4096.0, job_idle_s=0.0)


def test_split_spec_and_obfuscation_name_the_field_too():
    with pytest.raises(InvalidSetting) as err:
        models.SplitSpec("cnn", width=0.0).resolved()
    assert (err.value.field, str(err.value)) == ("width", "SplitSpec.width 0.0 must lie in [0.015625, 4.0]")
    with pytest.raises(InvalidSetting) as err:
        ObfuscationConfig(dropout=1.0)
    assert (err.value.field, str(err.value)) == ("dropout", "ObfuscationConfig.dropout must be in [0, 1), got 1.0")
