"""`attacker labels`: the cloud's label inference on a U-shaped session's captured traffic, scored.

The attacker's input is what a curious cloud holds: the per-example gradients the edge sent up
(`TrainGrad` records of a proxy capture or a server tap) and a few known labels per class (its
own examples among the edge's, or a few it labelled by hand: `known_per_class`). The truth
comes from the evaluation harness (`attacks.harness.PrivateSession`), which rebuilds each
training step's batch from the edge's report; it is read for the known labels and to score.

Keys of `labels.json` (`score`):
- `sessions`, `steps` (captured steps placed, each once), `rows` (examples), `num_classes`,
  `known_per_class`, `seed`;
- `per_step`: the attacks run on each step's batch alone (the same model behind every row):
  `direction_accuracy` (k-means of the directions, clusters named by the known labels) and
  `nearest_known_accuracy` (Li et al.'s cosine attack: each row takes the label of the known
  row it is most aligned with), over the unknown rows of every step;
- `per_epoch`: the same two per training epoch (a list, epoch 1 first): the gradients of a
  model that has learnt its task are smaller and less one-sided, so the leak changes as it trains;
- `pooled`: the direction attack on the rows of the last `pooled_steps` steps at once
  (`direction_accuracy`, `recall` per class);
- binary tasks only: `norm_leak_auc` and `cosine_leak_auc` (Li et al.'s leak AUC, in [0.5, 1],
  averaged over steps; the cosine reference is the step's first known example of class 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from attacks.harness import PrivateSession, by_session_id
from attacks.label_inference import (cosine_scores, direction_attack, leak_auc, nearest_known_attack, norm_scores,
                                     pick_known)
from splitnet import capture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapturedStep:
    session_id: str
    step_id: int
    epoch: int  # of the edge's training, from 1
    grads: torch.Tensor  # [B, ...] as the cloud received them
    labels: torch.Tensor  # [B], the truth (harness)


def captured_steps(capture_dir: str, sessions: list[PrivateSession], train_labels: torch.Tensor) -> list[CapturedStep]:
    """Every captured gradient batch of `sessions` the harness can place, each step once (one re-sent
    after a reconnect is captured twice), in step order."""
    placed, seen = [], set()
    known_sessions = by_session_id(sessions)
    for record in capture.read_records(capture_dir):
        session = known_sessions.get(record.session_id)
        if record.method != "TrainGrad" or session is None:
            continue
        indices = session.train_indices(record.step_id)
        key = (session.session_id, record.step_id)
        if indices is None or key in seen:
            continue
        seen.add(key)
        grads = capture.load_features(capture_dir, record)
        if grads.shape[0] != len(indices):
            raise ValueError(f"step {record.step_id} of session {record.session_id}: {grads.shape[0]} gradient rows "
                             f"for a batch of {len(indices)} (is this the report of the captured run?)")
        placed.append(CapturedStep(session.session_id, record.step_id, session.epoch(record.step_id), grads,
                                   train_labels[indices]))
    if not placed:
        raise ValueError(f"{capture_dir} holds no gradient of these sessions: capture a U-shaped run "
                         "(edge-client --u-shaped) through `attacker proxy --capture` or `cloud-server --tap`")
    return sorted(placed, key=lambda s: (s.session_id, s.step_id))


def score(steps: list[CapturedStep], num_classes: int, known_per_class: int = 1, seed: int = 0,
          pooled_steps: int = 20) -> dict:
    """The attacks on `steps` (see the module's keys)."""
    hits: dict[int, list[float]] = {}  # epoch -> [direction hits, nearest-known hits, unknown rows]
    norm_aucs, cosine_aucs = [], []
    for i, step in enumerate(steps):
        known = pick_known(step.labels, known_per_class, seed + i)
        rows = int((~known).sum())
        if rows == 0:
            continue
        tally = hits.setdefault(step.epoch, [0.0, 0.0, 0.0])
        tally[0] += direction_attack(step.grads, step.labels, known, num_classes, seed).accuracy * rows
        tally[1] += nearest_known_attack(step.grads, step.labels, known, num_classes).accuracy * rows
        tally[2] += rows
        if num_classes == 2 and 0 < int(step.labels.sum()) < len(step.labels):
            norm_aucs.append(leak_auc(norm_scores(step.grads), step.labels))
            reference = step.grads[(known & (step.labels == 1)).nonzero()[0, 0]]
            cosine_aucs.append(leak_auc(cosine_scores(step.grads, reference), step.labels))
    last = steps[-pooled_steps:] if pooled_steps else steps
    grads, labels = torch.cat([s.grads for s in last]), torch.cat([s.labels for s in last])
    pooled = direction_attack(grads, labels, pick_known(labels, known_per_class, seed), num_classes, seed)
    result = {
        "sessions": len({s.session_id for s in steps}), "steps": len(steps), "rows": sum(len(s.labels) for s in steps),
        "num_classes": num_classes, "known_per_class": known_per_class, "seed": seed,
        "per_step": _accuracies([sum(t[k] for t in hits.values()) for k in range(3)]),
        "per_epoch": [{"epoch": epoch, **_accuracies(hits[epoch])} for epoch in sorted(hits)],
        "pooled": {"steps": len(last), "direction_accuracy": pooled.accuracy, "recall": list(pooled.recall)},
    }
    if norm_aucs:
        result["norm_leak_auc"] = sum(norm_aucs) / len(norm_aucs)
        result["cosine_leak_auc"] = sum(cosine_aucs) / len(cosine_aucs)
    return result


def _accuracies(tally: list[float]) -> dict:
    direction, nearest, unknown = tally
    return {"direction_accuracy": direction / max(unknown, 1), "nearest_known_accuracy": nearest / max(unknown, 1)}
