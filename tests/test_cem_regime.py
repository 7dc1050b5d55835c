"""CEM in the paper's regime on the edge: the pull it reports, the full-lambda phase, and the
calibrated defaults of the gated and slot surrogates (docs/CEM.md §4)."""

import pytest

from cloud_server.local import LocalCloud
from edge_client.cli import add_training_args, config_from_args
from edge_client.config import DefenseConfig, EdgeConfig
from edge_client.trainer import EdgeTrainer, run
from splitnet.cli_util import Parser


@pytest.mark.slow
def test_cem_pull_is_reported_and_w_lr_reaches_full_lambda_at_the_milestone(caplog):
    """The paper's regime: once the schedule drops the rate below 4.1e-4, w_lr = 0.001 / lr
    turns into 1, so the same lambda pulls 50x harder; a tiny lambda is flagged as inactive."""
    def cem_run(lam: float) -> list[dict]:
        defense = DefenseConfig(noise=0.1, cem="gmm", lam=lam)  # GMM's warm-up: epoch 1 fits its first mixture
        config = EdgeConfig(epochs=3, lr=0.05, lr_schedule="multistep:2:0.001", bottleneck=8, defense=defense,
                            progress=False)
        history = run(config, LocalCloud())["history"]
        assert "cem_pull" not in history[0]
        return history[1:]

    with caplog.at_level("WARNING", logger="edge_client.cem_hook"):
        tiny = cem_run(1e-6)
    assert [h["cem_w_lr"] for h in tiny] == pytest.approx([0.001 / 0.05, 1.0])
    assert all(h["cem_pull"] < 0.01 for h in tiny)
    assert sum("CEM is not acting" in r.message for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="edge_client.cem_hook"):
        strong = cem_run(16)
    assert not any("CEM is not acting" in r.message for r in caplog.records)
    assert strong[0]["cem_pull"] > 0.01
    # the same lambda pulls harder per unit of task gradient after the drop (w_lr 0.02 -> 1)
    assert strong[1]["cem_pull"] > 10 * strong[0]["cem_pull"]


def test_slot_shutoff_spans_a_quarter_epoch_on_any_dataset():
    """The seeds' 100 calls are a quarter of a CIFAR-10 epoch but four of an 8-epoch digits run."""
    defense = DefenseConfig(noise=0.1, cem="slot", lam=8)
    shutoff = {}
    for batch_size in (64, 16):
        trainer = EdgeTrainer(EdgeConfig(epochs=8, batch_size=batch_size, defense=defense, progress=False),
                              LocalCloud())
        shutoff[batch_size] = trainer.cem.module.early_shut_steps
        assert shutoff[batch_size] == -(-len(trainer.loader) // 4)
    assert shutoff == {64: 6, 16: 23}  # digits: 23 steps an epoch at batch 64, 90 at 16; never the seeds' 100


def test_gated_and_slot_run_without_their_gates_unless_asked():
    """The calibrated default (docs/CEM.md §4.1): the soft and SNR gates closed most of the
    penalty on sigmoid features; `--cem-gates on` brings the seeds' gated variant back."""
    p = Parser()
    add_training_args(p)
    for argv, gates in (([], False), (["--cem-gates", "on"], True), (["--cem-gates", "off"], False)):
        config = config_from_args(p.parse_args(["--noise", "0.1", "--cem", "gated", "--lambda", "8", *argv]), p)
        bank = EdgeTrainer(config, LocalCloud()).cem.module.bank
        assert bank.gates is gates and (bank.soft is not None) is gates
    slot = EdgeTrainer(EdgeConfig(defense=DefenseConfig(noise=0.1, cem="slot", lam=8)), LocalCloud()).cem.module
    assert slot.bank.gates is False
