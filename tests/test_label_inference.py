"""Label inference from a U-shaped split's gradients, and the edge's defenses, on real gradients.

A small head (middle output -> Linear -> ReLU -> Linear -> softmax cross-entropy) on Gaussian
class clusters gives the gradients dLoss/d(middle output) the edge would send up: ten balanced
classes for the direction attacks, and an imbalanced binary task (10 % positives) for the norm
and cosine scores, where Li et al. show the norm leaks. The head trains a few SGD steps first:
an untrained head's gradients do not yet separate the binary classes by norm.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from attacks.label_inference import (LabelRecovery, cosine_scores, direction_attack, leak_auc,
                                     nearest_known_attack, norm_scores, pick_known)
from edge_client.label_defense import LABEL_DEFENSES, LabelDefense, gaussian, marvell, max_norm
from splitnet.settings import InvalidSetting

DIM, CLASSES = 64, 10


def clusters(n: int, classes: int, seed: int, positive_share: float | None = None) -> tuple[Tensor, Tensor]:
    """Middle outputs around one random mean per class; balanced, or binary with that share of 1s."""
    generator = torch.Generator().manual_seed(seed)
    if positive_share is None:
        labels = torch.arange(n) % classes
    else:
        labels = (torch.rand(n, generator=generator) < positive_share).long()
    means = torch.randn(classes, DIM, generator=generator)
    return means[labels] + torch.randn(n, DIM, generator=generator), labels


def head(classes: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, classes))


def gradients(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """dLoss/dx per example: what the edge sends up for a batch x."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), labels), x)[0]


def train(model: nn.Module, x: Tensor, labels: Tensor, steps: int, batch: int = 64) -> tuple[Tensor, Tensor]:
    """SGD steps on random batches; the gradient rows each step sent, and their labels, concatenated."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    rows, seen = [], []
    for _ in range(steps):
        index = torch.randint(len(x), (batch,), generator=generator)
        xb = x[index].clone().requires_grad_(True)
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(xb), labels[index]).backward()
        optimiser.step()
        rows.append(xb.grad.clone())
        seen.append(labels[index])
    return torch.cat(rows), torch.cat(seen)


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def multiclass() -> tuple[Tensor, Tensor]:
    x, labels = clusters(500, CLASSES, seed=0)
    model = head(CLASSES)
    train(model, x, labels, steps=20)
    return gradients(model, x, labels), labels


@pytest.fixture(scope="module")
def binary() -> tuple[Tensor, Tensor]:
    x, labels = clusters(1000, 2, seed=0, positive_share=0.1)
    model = head(2)
    train(model, x, labels, steps=20)
    return gradients(model, x, labels), labels


def first_positive(grads: Tensor, labels: Tensor) -> Tensor:
    return grads[(labels == 1).nonzero()[0, 0]]


# --- attacks ------------------------------------------------------------------------------------


def test_direction_attack_recovers_ten_classes_from_one_known_label_each(multiclass) -> None:
    grads, labels = multiclass
    result = direction_attack(grads, labels, pick_known(labels, per_class=1), CLASSES)
    assert isinstance(result, LabelRecovery) and result.known == CLASSES
    assert result.accuracy >= 0.9
    assert len(result.recall) == CLASSES and min(result.recall) >= 0.8


def test_clusters_without_known_labels_take_the_classes_the_matching_leaves(multiclass) -> None:
    grads, labels = multiclass
    known = pick_known(labels, per_class=1) & (labels != 3) & (labels != 7)  # nothing known of 3 and 7
    result = direction_attack(grads, labels, known, CLASSES)
    assert result.known == CLASSES - 2
    assert min(result.recall[3], result.recall[7]) >= 0.9 and result.accuracy >= 0.9


def test_direction_attack_on_rows_gathered_over_training_steps() -> None:
    x, labels = clusters(2000, CLASSES, seed=0)
    rows, seen = train(head(CLASSES), x, labels, steps=10)
    assert rows.shape == (640, DIM)
    assert direction_attack(rows, seen, pick_known(seen, per_class=1), CLASSES).accuracy >= 0.9


def test_nearest_known_attack_recovers_ten_classes(multiclass) -> None:
    grads, labels = multiclass
    assert nearest_known_attack(grads, labels, pick_known(labels, per_class=1), CLASSES).accuracy >= 0.9


def test_norm_and_cosine_leak_the_minority_class_of_an_imbalanced_binary_task(binary) -> None:
    grads, labels = binary
    assert leak_auc(norm_scores(grads), labels) > 0.9
    assert leak_auc(cosine_scores(grads, first_positive(grads, labels)), labels) > 0.95


def test_leak_auc_is_the_auc_either_way_round() -> None:
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    assert leak_auc(scores, labels) == pytest.approx(0.75)
    assert leak_auc(-scores, labels) == pytest.approx(0.75)
    assert leak_auc(scores, labels, positive=0) == pytest.approx(0.75)
    assert leak_auc(torch.tensor([1e3, 2e3, 3e3, 4e3]), labels) == 1.0  # large scores are not squashed into ties
    with pytest.raises(ValueError, match="class 1"):
        leak_auc(scores, torch.zeros(4, dtype=torch.long))


def test_norm_scores_are_per_example_norms() -> None:
    grads = torch.zeros(2, 3, 2, 2)
    grads[0, 0, 0, 0], grads[1, :, 0, 0] = 3.0, torch.tensor([1.0, 2.0, 2.0])
    assert norm_scores(grads).tolist() == [3.0, 3.0]


# --- defenses -----------------------------------------------------------------------------------


def test_max_norm_leaves_the_norm_no_signal(binary) -> None:
    grads, labels = binary
    defended = max_norm(grads, seeded())
    assert leak_auc(norm_scores(defended), labels) < 0.6
    squared = norm_scores(defended).square().mean()
    assert float(squared) == pytest.approx(float(norm_scores(grads).max() ** 2), rel=0.05)  # each row's expectation


def test_gaussian_noise_has_the_norm_its_strength_sets_and_hides_directions(multiclass) -> None:
    grads, labels = multiclass
    noise = gaussian(grads, seeded(), 2.0).double() - grads.double()
    assert float(norm_scores(noise).mean()) == pytest.approx(2.0 * float(norm_scores(grads).mean()), rel=0.05)
    known = pick_known(labels, per_class=1)
    assert direction_attack(gaussian(grads, seeded(), 0.1), labels, known, CLASSES).accuracy >= 0.9
    assert direction_attack(gaussian(grads, seeded(), 10.0), labels, known, CLASSES).accuracy < 0.4


def test_marvell_spends_its_budget_and_leaks_less_than_isotropic_noise_of_that_power(binary) -> None:
    grads, labels = binary
    rows = grads.double()
    gap = (rows[labels == 1].mean(0) - rows[labels == 0].mean(0)).square().sum()
    defended = marvell(grads, labels, seeded(), 1.0)
    power = (defended.double() - rows).square().sum(1).mean()
    assert float(power) == pytest.approx(float(gap), rel=0.1)
    isotropic = gaussian(grads, seeded(), float(power.sqrt() / norm_scores(grads).mean()))
    assert leak_auc(norm_scores(defended), labels) < 0.65 < leak_auc(norm_scores(isotropic), labels)


def test_stronger_marvell_hides_directions_better(binary) -> None:
    grads, labels = binary
    aucs = [leak_auc(cosine_scores(d, first_positive(d, labels)), labels)
            for d in (marvell(grads, labels, seeded(), s) for s in (0.0, 1.0, 4.0))]
    assert aucs[0] > 0.95 and aucs[0] > aucs[1] > aucs[2] and aucs[2] < 0.75


def test_marvell_returns_a_batch_of_one_class_as_it_is_and_refuses_other_labels(binary) -> None:
    grads, _ = binary
    assert torch.equal(marvell(grads[:8], torch.zeros(8, dtype=torch.long), seeded(), 1.0), grads[:8])
    with pytest.raises(ValueError, match="binary"):
        marvell(grads[:3], torch.tensor([0, 1, 2]), seeded(), 1.0)
    with pytest.raises(ValueError, match="labels"):
        LabelDefense("marvell", 1.0).apply(grads, seeded())


DEFENSES = [LabelDefense(), LabelDefense("gaussian", 1.0), LabelDefense("max_norm"), LabelDefense("marvell", 1.0)]


@pytest.mark.parametrize("defense", DEFENSES, ids=lambda d: d.kind)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_each_defense_keeps_shape_and_dtype_and_repeats_under_a_seed(defense: LabelDefense, dtype) -> None:
    grads = torch.randn(16, 4, 3, 3, generator=seeded(0)).to(dtype)
    labels = torch.arange(16) % 2
    first = defense.apply(grads, seeded(7), labels)
    assert first.shape == grads.shape and first.dtype == dtype
    assert torch.equal(first, defense.apply(grads, seeded(7), labels))
    assert torch.equal(first, grads) == (defense.kind == "none")
    if defense.kind != "none":
        assert not torch.equal(first, defense.apply(grads, seeded(8), labels))


def test_the_defenses_cover_every_kind() -> None:
    assert sorted(d.kind for d in DEFENSES) == sorted(LABEL_DEFENSES)


@pytest.mark.parametrize("settings, field", [
    ({"kind": "laplace"}, "kind"),
    ({"kind": "gaussian", "strength": -0.5}, "strength"),
    ({"kind": "gaussian", "strength": math.nan}, "strength"),
    ({"kind": "max_norm", "strength": 1.0}, "strength"),
    ({"kind": "none", "strength": 2.0}, "strength"),
])
def test_invalid_settings_name_their_field(settings: dict, field: str) -> None:
    with pytest.raises(InvalidSetting, match=f"LabelDefense.{field} must be") as error:
        LabelDefense(**settings)
    assert error.value.field == field and isinstance(error.value, ValueError)


def test_the_scored_run_reads_a_binary_tasks_leak_per_step_and_per_epoch(binary) -> None:
    """`attacks.label_run.score` on steps of 100 rows, as `attacker labels` gathers them from a capture:
    a binary task gets Li et al.'s norm and cosine leak AUC per step, and every figure per epoch."""
    from attacks.label_run import CapturedStep, score

    grads, labels = binary
    steps = [CapturedStep("s", i + 1, 1 + i // 5, grads[i * 100:(i + 1) * 100], labels[i * 100:(i + 1) * 100])
             for i in range(10)]
    result = score(steps, num_classes=2, pooled_steps=4)
    assert result["steps"] == 10 and result["rows"] == 1000 and [e["epoch"] for e in result["per_epoch"]] == [1, 2]
    assert result["norm_leak_auc"] > 0.9 and result["cosine_leak_auc"] > 0.9
    assert result["per_step"]["direction_accuracy"] > 0.9 and result["pooled"]["steps"] == 4
    noised = [CapturedStep(s.session_id, s.step_id, s.epoch, max_norm(s.grads, seeded()), s.labels) for s in steps]
    assert score(noised, num_classes=2)["norm_leak_auc"] < 0.65
