"""The evaluation harness: the one party that holds the private images and the attack's output.

An attacker never sees ground truth. The harness rebuilds, from the edge's own report,
which private images went into each message of a session, and aligns them with the
reconstructions by (session id, method, step id):
- an inference request `i` carries test images `i * eval_batch_size` onwards (the edge
  sends its test set in order);
- training step `first_step_id + k` carries the k-th batch of
  `splitnet.data.training_loader(train set, batch_size, seed)`, which the harness replays
  over indices. A session that trained on part of the training set (a Ray client's shard)
  says so (`train_shard`); its training steps cannot be placed and are skipped. A session
  trained with augmentation (`augment` in the report) sent cropped and flipped images; the
  augmentation is a pure function of (seed, epoch, index) (`splitnet.data.augment`), so the
  harness rebuilds and scores against the exact pixels each step carried.
A reconnect opens a new session: the report's `session_ids` lists them all, and a step
captured under two of them (sent, then replayed) is scored once.

Reconstruction folders (written by `attacker run` and `cloud-server --hijack`; `splitnet.recon_file`):
- `recon.jsonl`: one JSON object per reconstructed batch: `seq` (the capture record it
  came from), `method` (Train | Infer), `session_id`, `step_id`, `file`;
- `recon/NNNNNNNN.npy`: float32 images [N, C, H, W] in [0, 1] (allow_pickle=False);
- `run.json`: the attack's settings and timings.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import islice

import torch
from torch.utils.data import DataLoader, Dataset

from splitnet import data
from splitnet.recon_file import clear_reconstructions, read_reconstructions, write_reconstruction  # noqa: F401

log = logging.getLogger(__name__)


def private_requests(test_set: Dataset, eval_batch_size: int) -> list[torch.Tensor]:
    """The private images of each inference request, in request-id order."""
    return [x for x, _ in DataLoader(test_set, batch_size=eval_batch_size)]


class PrivateSession:
    """The private images behind one attacked session's traffic, rebuilt from its edge report."""

    def __init__(self, report: dict, splits: data.Splits) -> None:
        self.session_id = report["session_id"]
        self.session_ids = report.get("session_ids") or [self.session_id]  # every reconnect opened one
        self.eval_batch_size = report["eval_batch_size"]
        self.requests = private_requests(splits.test, self.eval_batch_size)
        self.train_set = splits.train
        self.first_step = report.get("first_step_id", 0)
        self.steps_per_epoch = max(1, data.batches_per_pass(report["train_set_size"], report["batch_size"]))
        self.augment_seed = report["seed"] if report.get("augment") else None
        self.batches: list[torch.Tensor] = []  # dataset indices of the k-th training step
        if not report.get("train_shard") and report["train_set_size"] == len(splits.train):
            order = data.training_order(len(splits.train), report["batch_size"], report["seed"])
            self.batches = list(islice(order, report["steps"]))
        else:
            log.warning("session %s trained on %d of the %d training images (a shard): its training steps are not "
                        "scored", self.session_id, report["train_set_size"], len(splits.train))

    def infer_indices(self, step_id: int, count: int) -> torch.Tensor:
        """Test-split indices of the images of inference request `step_id` (the edge sends them in order)."""
        start = step_id * self.eval_batch_size
        return torch.arange(start, start + count)

    def train_indices(self, step_id: int) -> torch.Tensor | None:
        k = step_id - self.first_step - 1
        return self.batches[k] if 0 <= k < len(self.batches) else None

    def truth(self, method: str, step_id: int) -> torch.Tensor | None:
        """The private images of a message, or None where the harness cannot place it."""
        if method == "Infer":
            return self.requests[step_id] if 0 <= step_id < len(self.requests) else None
        indices = self.train_indices(step_id)
        if indices is None:
            return None
        images = [self.train_set[int(i)][0] for i in indices]
        if self.augment_seed is not None:
            epoch = self.epoch(step_id)
            images = [data.augment(x, self.augment_seed, epoch, int(i)) for x, i in zip(images, indices)]
        return torch.stack(images)

    def epoch(self, step_id: int) -> int:
        return (step_id - self.first_step - 1) // self.steps_per_epoch + 1


@dataclass
class Pair:
    method: str
    epoch: int  # training epoch of a Train step; 0 for inference
    recon: torch.Tensor
    truth: torch.Tensor
    indices: torch.Tensor | None = None  # test-split indices of an inference message's images
    step_id: int = 0  # the training step of a Train pair (0 for inference)


def by_session_id(sessions: list[PrivateSession]) -> dict[str, PrivateSession]:
    """Each session under every id it had: steps replayed after a reconnect carry the new id."""
    return {sid: session for session in sessions for sid in session.session_ids}


def align(reconstructions: list[tuple[dict, torch.Tensor]], sessions: dict[str, PrivateSession]) -> list[Pair]:
    """(reconstruction, truth) pairs of the messages the harness can place, each message once
    (a step replayed after a reconnect is captured twice, under the old and the new id)."""
    pairs, seen = [], set()
    for row, images in reconstructions:
        session = sessions.get(row["session_id"])
        expected = session.truth(row["method"], row["step_id"]) if session else None
        if expected is None:
            continue
        key = (session.session_id, row["method"], row["step_id"])
        if key in seen:
            continue
        if expected.shape != images.shape:
            raise ValueError(f"{row['method']} {row['step_id']} of session {row['session_id']}: reconstruction "
                             f"{list(images.shape)} vs private images {list(expected.shape)}")
        seen.add(key)
        if row["method"] == "Train":
            pairs.append(Pair("Train", session.epoch(row["step_id"]), images, expected, step_id=row["step_id"]))
        else:
            pairs.append(Pair("Infer", 0, images, expected, session.infer_indices(row["step_id"], len(images))))
    if not pairs:
        raise ValueError("no reconstruction matches a known request or training step (wrong --edge-report?)")
    return pairs


def select(pairs: list[Pair], sample: torch.Tensor) -> Pair:
    """The inference images of `sample` (test-split indices) as one pair, in the sample's order;
    ValueError if the attack did not reconstruct all of them (`attacker run --max-records`)."""
    position = {int(i): k for k, i in enumerate(sample)}
    recon: list[torch.Tensor | None] = [None] * len(sample)
    truth: list[torch.Tensor | None] = [None] * len(sample)
    for pair in pairs:
        if pair.indices is None:
            continue
        for row, index in enumerate(pair.indices.tolist()):
            if index in position:
                recon[position[index]], truth[position[index]] = pair.recon[row], pair.truth[row]
    missing = sum(r is None for r in recon)
    if missing:
        raise ValueError(f"{missing} of the {len(sample)} sample images were not reconstructed (the capture holds "
                         "part of the test split, or `attacker run --max-records` attacked part of it)")
    return Pair("Infer", 0, torch.stack(recon), torch.stack(truth), sample)  # type: ignore[arg-type]


def describe_sample(indices: torch.Tensor, targets: torch.Tensor, per_class: int, seed: int) -> dict:
    """What a report says of a scoring sample: its rule, size per class, and a digest of its indices
    (two results scored the same images exactly when their digests match)."""
    counts = torch.bincount(targets[indices], minlength=int(targets.max()) + 1)
    return {"rule": f"{per_class} test images per class, drawn with seed {seed} (splitnet.data.stratified)",
            "per_class": per_class, "seed": seed, "images": len(indices), "per_class_images": counts.tolist(),
            "indices_sha256": hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()}


def class_rows(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Row numbers of the first `per_class` images of each class, class by class (for a grid)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique(sorted=True)])


# The split of the private dataset behind each kind of traffic.
PRIVATE_SPLIT = {"Infer": "test", "Train": "train"}


def check_aux_disjoint(pairs: list[Pair], run_info: dict, datasets: set[str]) -> None:
    """Refuse to score an attack on the very images it trained on: that measures memory, not leakage."""
    for kind in sorted({p.method for p in pairs}):
        split = PRIVATE_SPLIT[kind]
        if run_info.get("aux_dataset") in datasets and run_info.get("aux_split") == split:
            other = "test" if split == "train" else "train"
            raise ValueError(f"the attack trained on the {run_info['aux_dataset']} {split} split, which holds the "
                             f"private images of the {kind} traffic it would be scored on; run `attacker run` with "
                             f"--aux-split {other} (and --only {kind}) for an honest score")


def score_pairs(pairs: list[Pair], method: str, by_step: bool = False) -> dict:
    """The scores over every aligned image, then per traffic kind and per training epoch:
    features sent while the encoder was young may leak differently from the final ones.
    Each image is scored once; the groups are means over its per-image scores. `by_step`: also
    per training step (`train_by_step`), for an attack that changes the encoder as it goes (a
    hijacking cloud records a batch every few steps)."""
    from attacks import metrics  # torchmetrics: scoring needs it, `attacker run` (which writes reconstructions) not

    values = metrics.per_image(torch.cat([p.recon for p in pairs]), torch.cat([p.truth for p in pairs]))
    epochs = torch.cat([torch.full((len(p.recon),), p.epoch) for p in pairs])
    train = torch.cat([torch.full((len(p.recon),), p.method == "Train") for p in pairs])
    steps = torch.cat([torch.full((len(p.recon),), p.step_id) for p in pairs])

    def mean(mask: torch.Tensor) -> dict:
        return {**{name: float(v[mask].mean()) for name, v in values.items()}, "n_images": int(mask.sum())}

    kinds = {"Infer": ~train, "Train": train}
    return {**mean(torch.ones_like(train)), "method": method, "ssim_convention": metrics.SSIM_CONVENTION,
            "by_traffic": {kind: mean(mask) for kind, mask in kinds.items() if mask.any()},
            "train_by_epoch": [{"epoch": int(e), **mean(train & (epochs == e))} for e in epochs[train].unique()],
            **({"train_by_step": [{"step_id": int(s), **mean(train & (steps == s))} for s in steps[train].unique()]}
               if by_step else {})}


def score(recon: torch.Tensor, truth: torch.Tensor, method: str) -> dict:
    from attacks import metrics

    return {**metrics.score(recon, truth), "n_images": len(recon), "method": method,
            "ssim_convention": metrics.SSIM_CONVENTION}
