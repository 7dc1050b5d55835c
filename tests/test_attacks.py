"""The attacks reconstruct digits, defenses hurt them, and the target model is never touched.

The target is the zoo's cnn trained briefly (120 steps of local training on the digits
train split, seed 1): a trained encoder is what a real attacker faces. The attacker's
auxiliary data is the first half of the train split; scores are on the test split,
which it never sees. Attack epochs are cut down from the defaults to keep this file fast;
the thresholds leave room for that.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from attacks.config import AttackConfig
from attacks.grid import save_grid
from attacks.inversion import reconstruct, train_inversion
from attacks.inversion_models import InversionDecoder
from attacks.metrics import score
from attacks.rmle import rmle, total_variation
from attacks.runner import Attacker
from attacks.shadow import shadow_attack, train_shadow_encoder
from splitnet.data import Splits, load, DataSpec
from splitnet.models import SplitModel, SplitSpec, build, cut_points

FAST = {"epochs": 10, "width": 32, "progress": False}


def _train_split(data: Splits, bottleneck: int = 0, steps: int = 120, seed: int = 1) -> SplitModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        split = build(SplitSpec("cnn", "", data.num_classes, data.input_shape, bottleneck))
        x, y = data.train.tensors  # type: ignore[attr-defined]
        model = nn.Sequential(split.encoder, split.decoder)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(len(x), (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)  # so that a gradient seen later was written by an attack
    return split


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load(DataSpec())


@pytest.fixture(scope="module")
def target(digits: Splits) -> SplitModel:
    return _train_split(digits)


@pytest.fixture(scope="module")
def sigmoid_target(digits: Splits) -> SplitModel:
    return _train_split(digits, bottleneck=8)


def _aux(digits: Splits) -> TensorDataset:
    x, y = digits.train.tensors  # type: ignore[attr-defined]
    return TensorDataset(x[: len(x) // 2], y[: len(x) // 2])


def _private(digits: Splits, encoder: nn.Module, n: int | None = None) -> tuple[Tensor, Tensor]:
    x = digits.test.tensors[0][:n]  # type: ignore[attr-defined]
    encoder.eval()
    with torch.no_grad():
        return x, encoder(x)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return copy.deepcopy(model.state_dict())


def _assert_untouched(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an attack changed the target's weights or stats"
    assert all(p.grad is None for p in model.parameters()), "an attack wrote gradients into the target"


SHAPE_CASES = [("cnn", (1, 16, 16))] + [(arch, (3, 32, 32)) for arch in ("vgg11_bn", "resnet20")]


@pytest.mark.parametrize("arch,image_shape,cut", [(a, s, c) for a, s in SHAPE_CASES for c in cut_points(a)])
def test_inversion_decoder_restores_the_image_shape_at_every_cut(arch: str, image_shape: tuple[int, int, int],
                                                                 cut: str) -> None:
    feature_shape = build(SplitSpec(arch, cut, 10, image_shape)).feature_shape
    out = InversionDecoder(feature_shape, image_shape, width=8)(torch.rand(2, *feature_shape))
    assert out.shape == (2, *image_shape)
    assert out.min() >= 0 and out.max() <= 1


def test_inversion_decoder_handles_a_non_power_of_two_factor() -> None:
    # 28 px pooled three times is 3 px: 3 doublings reach 24, a final resize reaches 28.
    out = InversionDecoder((8, 3, 3), (1, 28, 28), width=8)(torch.rand(2, 8, 3, 3))
    assert out.shape == (2, 1, 28, 28)


@pytest.mark.slow
def test_inversion_reconstructs_private_digits(digits: Splits, target: SplitModel, tmp_path) -> None:
    before = _snapshot(target.encoder)
    decoder = train_inversion(target.encoder, _aux(digits), target.feature_shape, digits.input_shape, **FAST)
    truth, z = _private(digits, target.encoder)
    recon = reconstruct(decoder, z)
    result = score(recon, truth)
    assert result["ssim"] >= 0.7, result
    _assert_untouched(target.encoder, before)
    save_grid(truth[:16], recon[:16], tmp_path / "grid.png", nrow=8)
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_noise_defense_lowers_ssim_against_the_noise_aware_attacker(digits: Splits,
                                                                    sigmoid_target: SplitModel) -> None:
    # sigma 1.0 on sigmoid features in [0, 1] drowns them: far beyond the CEM settings
    # (<= 0.15), so the drop is certain, and the attacker must see the noise in training.
    sigma, calls = 1.0, []

    def noise(z: Tensor) -> Tensor:
        calls.append(z.shape[0])
        return z + sigma * torch.randn_like(z)

    enc, shapes = sigmoid_target.encoder, (sigmoid_target.feature_shape, digits.input_shape)
    truth, z = _private(digits, enc)
    clean = train_inversion(enc, _aux(digits), *shapes, **FAST)
    aware = train_inversion(enc, _aux(digits), *shapes, obfuscate=noise, **FAST)
    assert sum(calls) == FAST["epochs"] * len(_aux(digits))  # every training feature was obfuscated
    noisy_z = z + sigma * torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    clean_score = score(reconstruct(clean, z), truth)["ssim"]
    defended = score(reconstruct(aware, noisy_z), truth)["ssim"]
    unaware = score(reconstruct(clean, noisy_z), truth)["ssim"]
    assert clean_score >= 0.7
    assert defended < clean_score - 0.2
    assert defended > unaware  # modelling the defense is what makes the attacker strong


def test_training_is_seeded_and_leaves_global_rng_alone(digits: Splits, target: SplitModel) -> None:
    aux = digits.train.tensors[0][:128]  # type: ignore[attr-defined]
    state = torch.random.get_rng_state()
    runs = [train_inversion(target.encoder, aux, target.feature_shape, digits.input_shape, epochs=1, width=8,
                            progress=False) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rmle_improves_on_the_flat_start_at_conv1(digits: Splits, target: SplitModel) -> None:
    conv1 = target.encoder[:1]  # the conv1 cut of the same trained model
    before = _snapshot(conv1)
    truth, z = _private(digits, conv1, n=32)
    flat = score(torch.full_like(truth, 0.5), truth)
    result = score(rmle(conv1, z, digits.input_shape, iterations=200), truth)
    assert result["ssim"] > flat["ssim"] + 0.5 and result["mse"] < flat["mse"] / 10, (flat, result)
    _assert_untouched(conv1, before)


@pytest.mark.parametrize("cut,method", [("block1", "decoder"), ("conv1", "rmle")])
def test_shadow_attack_runs_end_to_end(digits: Splits, target: SplitModel, cut: str, method: str) -> None:
    depth = cut_points("cnn").index(cut) + 1  # re-cut the trained model without retraining it
    encoder, cloud = target.encoder[:depth], nn.Sequential(*target.encoder[depth:], *target.decoder)
    before = _snapshot(cloud)
    truth, z = _private(digits, encoder, n=16)

    def factory() -> nn.Module:
        return build(SplitSpec("cnn", cut, 10, digits.input_shape)).encoder

    recon = shadow_attack(factory, cloud, _aux(digits), z, digits.input_shape, method, shadow_epochs=2,
                          inversion_epochs=2, progress=False)
    assert recon.shape == truth.shape
    assert all(math.isfinite(v) for v in score(recon, truth).values())
    _assert_untouched(cloud, before)


def test_shadow_encoder_learns_to_serve_the_cloud(digits: Splits, target: SplitModel) -> None:
    def factory() -> nn.Module:
        return build(target.spec).encoder

    shadow = train_shadow_encoder(factory, target.decoder, _aux(digits), epochs=10, progress=False)
    x, y = digits.test.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        accuracy = (target.decoder.eval()(shadow(x)).argmax(1) == y).float().mean()
    assert accuracy > 0.8
    assert not any(torch.equal(a, b) for a, b in zip(shadow.parameters(), target.encoder.parameters()))


def test_shadow_attack_rejects_unknown_method(digits: Splits, target: SplitModel) -> None:
    with pytest.raises(ValueError, match="unknown shadow"):
        shadow_attack(lambda: build(target.spec).encoder, target.decoder, _aux(digits), torch.zeros(1, 64, 8, 8),
                      digits.input_shape, "magic")  # type: ignore[arg-type]


def _res_blocks(decoder: nn.Module) -> list[nn.Module]:
    return [m for m in decoder.modules() if type(m).__name__ == "_ResBlock"]


def test_inverse_network_defaults_follow_the_input() -> None:
    rgb, gray = AttackConfig().resolved((3, 32, 32)), AttackConfig().resolved((1, 16, 16))
    assert (rgb.blocks, rgb.width, rgb.epochs) == (8, 64, 50)  # the CEM paper's attacker on colour images
    assert (gray.blocks, gray.width, gray.epochs) == (2, 64, 50)
    assert AttackConfig(blocks=1, width=8, epochs=3).resolved((3, 32, 32)) == AttackConfig(blocks=1, width=8, epochs=3)
    spec = SplitSpec("vgg11_bn", "conv1", 10, (3, 32, 32))  # the Attacker resolves against its target's input
    assert Attacker(AttackConfig(), spec, torch.zeros(0), encoder=build(spec).encoder).config == rgb
    with pytest.raises(ValueError, match="blocks"):
        AttackConfig(blocks=-1)


def test_attacker_builds_and_trains_the_inverse_network_it_is_asked_for(digits: Splits, target: SplitModel) -> None:
    aux = digits.train.tensors[0][:128]  # type: ignore[attr-defined]
    config = AttackConfig("inversion", epochs=3, blocks=3, width=8, progress=False)
    attacker = Attacker(config, target.spec, aux, encoder=target.encoder).fit()
    inverse = attacker._inverse
    assert len(_res_blocks(inverse)) == 3
    convs = [m for m in inverse.body.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(m.out_channels == 8 for m in convs)
    assert len(inverse.loss_history) == 3 and all(math.isfinite(v) for v in inverse.loss_history)
    assert attacker.settings() == {"inverse_blocks": 3, "inverse_width": 8, "inverse_epochs": 3,
                                   "inverse_loss_history": inverse.loss_history}
    # unset, the digits default: 2 blocks
    light = Attacker(AttackConfig("inversion", epochs=1, width=8, progress=False), target.spec, aux,
                     encoder=target.encoder).fit()
    assert len(_res_blocks(light._inverse)) == 2 and len(light._inverse.loss_history) == 1


def _identity_encoder(channels: int = 1) -> nn.Module:
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return conv


def test_rmle_solves_the_regularised_objective_within_the_image_range() -> None:
    """Through an identity encoder argmin_x ||x - z||^2 is z itself, projected onto [0, 1]: rMLE
    must find it, and the TV weight, iterations and lr it is given must be the ones it uses."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = x.clone()
    z[:, :, 0, 0] = 1.5  # out of the image range: the best image in [0, 1] is 1 there
    encoder = _identity_encoder()
    recon = rmle(encoder, z, (1, 8, 8), iterations=300, lr=0.05, tv_weight=0.0)
    assert (recon[:, :, 0, 0] == 1.0).all() and recon.min() >= 0
    assert (recon - z.clamp(0, 1)).abs().max() < 0.02
    smooth = rmle(encoder, z, (1, 8, 8), iterations=300, lr=0.05, tv_weight=1.0)
    assert total_variation(smooth).mean() < 0.5 * total_variation(recon).mean()
    assert torch.equal(rmle(encoder, z, (1, 8, 8), iterations=0), torch.full_like(z, 0.5))  # the flat start
    assert torch.equal(rmle(encoder, z, (1, 8, 8), iterations=5, lr=0.0), torch.full_like(z, 0.5))


def test_attacker_passes_its_rmle_settings_on() -> None:
    spec = SplitSpec("cnn", "conv1", 10, (1, 16, 16))
    encoder = build(spec).encoder
    z = encoder.eval()(torch.rand(2, 1, 16, 16))
    config = AttackConfig("rmle", rmle_iterations=7, rmle_lr=0.03, rmle_tv_weight=0.2)
    attacker = Attacker(config, spec, torch.zeros(0), encoder=encoder).fit()
    expected = rmle(encoder, z, (1, 16, 16), iterations=7, lr=0.03, tv_weight=0.2)
    assert torch.equal(attacker.reconstruct(z), expected)
    assert not torch.equal(expected, rmle(encoder, z, (1, 16, 16), iterations=7))  # the settings matter
    assert attacker.settings() == {"rmle_iterations": 7, "rmle_lr": 0.03, "rmle_tv_weight": 0.2}


def test_grid_rows_alternate_private_and_reconstruction_and_are_labelled(tmp_path) -> None:
    # 10 images, 4 per row: 3 private rows (the last padded) interleaved with 3 recon rows.
    # Private tiles are dark grey, reconstructions light grey, so each row's kind is readable.
    import numpy as np
    from PIL import Image

    side, nrow, pad = 6, 4, 2
    truth, recon = torch.full((10, 1, side, side), 0.25), torch.full((10, 1, side, side), 0.75)
    save_grid(truth, recon, tmp_path / "grid.png", nrow=nrow)
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "grid.png").convert("L")).astype(np.int64))
    grid_width = nrow * (side + pad) + pad
    margin = image.shape[1] - grid_width
    assert margin > 0 and image.shape[0] == 6 * (side + pad) + pad
    for row in range(6):
        y = pad + row * (side + pad) + side // 2
        expected = round(0.25 * 255) if row % 2 == 0 else round(0.75 * 255)
        first_tile = image[y, margin + pad + side // 2].item()
        assert abs(first_tile - expected) <= 1, (row, first_tile)
        assert image[pad + row * (side + pad): (row + 1) * (side + pad), :margin].min() < 128, f"row {row} unlabelled"
    padded_tile = image[pad + 4 * (side + pad) + side // 2, margin + pad + 3 * (side + pad) + side // 2].item()
    assert padded_tile == 0  # the missing 11th-12th private images are black padding, not shifted images
