"""The obfuscation chain (shared by edge and attacker), NoPeek's distance correlation and DefenseConfig checks."""

from __future__ import annotations

import math

import pytest
import torch

from edge_client.config import DefenseConfig
from edge_client.defense import nopeek_loss
from splitnet.obfuscation import KEPT_CHANNELS, Obfuscation, topk_prune
from splitnet.settings import ObfuscationConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chain(generator_seed: int = 0, **fields) -> Obfuscation:
    return Obfuscation(ObfuscationConfig(**fields), torch.Generator().manual_seed(generator_seed))


def test_all_zero_is_the_identity():
    z = torch.rand(4, 8, 3, 3)
    assert torch.equal(chain()(z), z)


def test_dropout_has_no_rescale_and_acts_in_eval_mode():
    z = torch.rand(64, 8, 8, 8) + 0.5  # no exact zeros of its own
    module = chain(dropout=0.25).eval()
    out = module(z)
    kept = out != 0
    assert torch.equal(out[kept], z[kept])  # survivors unscaled: no 1 / (1 - p)
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    assert not torch.equal(module(z), out)  # a fresh mask per call, in eval mode too


def test_topk_zeroes_exactly_the_smallest_fraction_per_sample():
    torch.manual_seed(0)
    z = torch.randn(5, 4, 5, 5)  # 100 features per sample
    out = chain(topk=0.6)(z)
    flat_in, flat_out = z.flatten(1), out.flatten(1)
    for row_in, row_out in zip(flat_in, flat_out):
        zeroed = row_out == 0
        assert int(zeroed.sum()) == 60
        assert row_in[zeroed].abs().max() <= row_in[~zeroed].abs().min()
        assert torch.equal(row_out[~zeroed], row_in[~zeroed])


def test_topk_passes_gradient_to_kept_features_only():
    z = torch.tensor([[3.0, -0.1, 2.0, 0.2]], requires_grad=True)
    topk_prune(z, 0.5).sum().backward()
    assert z.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("sigma", [0.05, 0.5])
def test_gaussian_noise_std_is_sigma(sigma):
    z = torch.zeros(200, 500)
    noise = chain(noise=sigma)(z)
    assert abs(noise.std().item() / sigma - 1) < 0.01 and abs(noise.mean().item()) < 0.01 * sigma


def test_laplace_noise_uses_scale_sigma():
    b = 0.2
    noise = chain(noise=b, noise_kind="laplace")(torch.zeros(200, 500))
    assert torch.isfinite(noise).all()
    assert abs(noise.abs().mean().item() / b - 1) < 0.01  # E|X| = b
    assert abs(noise.std().item() / (math.sqrt(2) * b) - 1) < 0.02  # std = sqrt(2) b
    kurtosis = (noise**4).mean() / noise.var() ** 2
    assert 5.0 < kurtosis.item() < 7.0  # Laplace: 6 (a Gaussian would give 3)


def test_chain_order_and_generator_replay():
    z = torch.rand(8, 64)
    cfg = {"noise": 0.1, "dropout": 0.2, "topk": 0.5}
    a, b = chain(7, **cfg)(z), chain(7, **cfg)(z)
    assert torch.equal(a, b)
    assert not torch.equal(a, chain(8, **cfg)(z))
    assert (a == 0).float().mean().item() >= 0.5  # top-k ran last: nothing re-filled its zeros


def test_noise_gradient_passes_through():
    z = torch.rand(3, 10, requires_grad=True)
    chain(noise=0.1, dropout=0.3)(z).sum().backward()
    assert set(z.grad.unique().tolist()) <= {0.0, 1.0}


def test_dcor_independent_vs_dependent():
    """The V-statistic is biased upwards for independent data in many dimensions (~0.43
    here, 16 and 16 dims, n = 256), so the test compares against that level."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 4, 4, generator=g)
    independent = torch.rand(256, 16, generator=g)
    projected = torch.sigmoid(3 * x.flatten(1) @ torch.randn(16, 16, generator=g))
    low, mid = nopeek_loss(x, independent).item(), nopeek_loss(x, projected).item()
    high = nopeek_loss(x, x.flatten(1) ** 2).item()
    assert low < 0.5 < 0.7 < mid < high and high > 0.95
    shuffled = projected[torch.randperm(256, generator=g)]  # same marginals, pairing broken
    assert nopeek_loss(x, shuffled).item() < 0.5
    assert nopeek_loss(x, 3 * x + 1).item() == pytest.approx(1.0, abs=1e-4)  # invariant to scale and shift


def test_dcor_is_differentiable_and_finite_with_duplicates():
    x = torch.rand(16, 10)
    z = torch.cat([torch.rand(8, 4), torch.rand(8, 4)]).requires_grad_()
    z.data[1] = z.data[0]  # a zero pairwise distance off the diagonal
    loss = nopeek_loss(x, z)
    loss.backward()
    assert 0 <= loss.item() <= 1 and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    constant = torch.ones(16, 4, requires_grad=True)
    nopeek_loss(x, constant).backward()
    assert torch.isfinite(constant.grad).all()


@pytest.mark.parametrize("field, value", [
    ("noise", -0.1), ("noise", float("nan")), ("noise_kind", "uniform"), ("dropout", 1.0), ("dropout", -0.1),
    ("topk", 1.0), ("nopeek", -1.0), ("cem", "vae"), ("lam", -8.0), ("var_threshold", 0.0),
    ("cem_scale", -0.1), ("cem_warmup", -1), ("cem_warmup", 1.5),
    ("adv_weight", -1.0), ("adv_weight", float("inf")), ("adv_blocks", -1), ("adv_width", 0), ("adv_width", 8.0),
    ("adv_every", 0), ("adv_lr", 0.0), ("prune_ratio", 1.0), ("prune_ratio", -0.5),
    ("prune_freeze", -1), ("prune_freeze", 1.5), ("prune_freeze", 2),  # 2 without prune_ratio: nothing to freeze
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DefenseConfig\.{field} "):
        DefenseConfig(**{field: value})


def test_config_resolves_cem_defaults_and_activity():
    cfg = DefenseConfig(noise=0.1, cem="slot", lam=16.0)
    assert cfg.scale == 1.0 and cfg.warmup == 3 and cfg.gates is False
    assert not cfg.cem_active(3) and cfg.cem_active(4)
    assert DefenseConfig(noise=0.1, cem="gated", lam=16.0, cem_scale=0.5, cem_warmup=0).cem_active(1)
    assert not DefenseConfig(cem="gmm", lam=16.0).cem_active(5)  # no noise: CEM has nothing to work with
    report = cfg.as_dict()
    assert report["cem_scale"] == 1.0 and report["cem_warmup"] == 3 and report["cem"] == "slot"
    assert report["cem_gates"] is False
    assert set(report) == set(DefenseConfig.__dataclass_fields__)
    assert DefenseConfig().as_dict()["cem_scale"] == 0.0 and DefenseConfig().as_dict()["cem_gates"] is None
    assert DefenseConfig(noise=0.1, cem="gated", lam=8.0, cem_gates=True).gates is True
    assert DefenseConfig(noise=0.1, cem="gmm", lam=8.0, cem_gates=True).gates is None  # GMM has no gates


def test_attacker_rebuilds_the_edge_chain_from_the_saved_defense_record():
    # The encoder file carries DefenseConfig.as_dict(); the noise-aware attacker must get
    # exactly the edge's obfuscation from it, and ignore the training-only settings.
    edge = DefenseConfig(noise=0.05, noise_kind="laplace", dropout=0.2, topk=0.5, nopeek=1.0, cem="gated", lam=8.0)
    assert ObfuscationConfig.from_settings(edge.as_dict()) == edge.obfuscation
    z = torch.rand(6, 32)
    seed = torch.Generator().manual_seed
    assert torch.equal(Obfuscation(edge.obfuscation, seed(3))(z),
                       Obfuscation(ObfuscationConfig.from_settings(edge.as_dict()), seed(3))(z))


def test_attacker_replays_the_channels_a_pruning_edge_kept():
    """An encoder file of a pruning edge records the channels it sent: the attacker's chain zeroes the
    others after the noise, as the wire did."""
    record = {**DefenseConfig(noise=0.1, prune_ratio=0.5).as_dict(), KEPT_CHANNELS: [0, 2]}
    z = torch.rand(5, 4, 3, 3)
    sent = Obfuscation.from_settings(record, torch.Generator().manual_seed(1))(z)
    assert torch.equal(sent[:, [1, 3]], torch.zeros(5, 2, 3, 3))
    assert torch.equal(sent[:, [0, 2]], chain(1, noise=0.1)(z)[:, [0, 2]])
    assert Obfuscation.from_settings(DefenseConfig(noise=0.1).as_dict()).channels is None


@pytest.mark.parametrize("field, value", [("noise", -1.0), ("noise_kind", "uniform"), ("dropout", 1.0),
                                          ("topk", float("inf"))])
def test_a_saved_record_out_of_range_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"ObfuscationConfig\.{field} "):
        ObfuscationConfig.from_settings({field: value})
