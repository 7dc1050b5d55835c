"""The evaluation harness: the one party that holds the private images and the attack's output.

An attacker never sees ground truth. The harness rebuilds, from the edge's own report,
which private test images went into each inference request (the edge sends its test set
in order, `eval_batch_size` images per request, on session `session_id`), and aligns them
with reconstructions by (session id, request id).

Reconstruction folders (written by `attacker run`):
- `recon.jsonl`: one JSON object per reconstructed batch: `seq` (the capture record it
  came from), `method` (Train | Infer), `session_id`, `step_id`, `file`;
- `recon/NNNNNNNN.npy`: float32 images [N, C, H, W] in [0, 1] (allow_pickle=False);
- `run.json`: the attack's settings and timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from attacks import metrics


def write_reconstruction(out: Path, seq: int, method: str, session_id: str, step_id: int, images: torch.Tensor) -> None:
    (out / "recon").mkdir(parents=True, exist_ok=True)
    name = f"recon/{seq:08d}.npy"
    np.save(out / name, images.float().numpy(), allow_pickle=False)
    with open(out / "recon.jsonl", "a") as f:
        f.write(json.dumps({"seq": seq, "method": method, "session_id": session_id, "step_id": step_id,
                            "file": name}) + "\n")


def read_reconstructions(recon_dir: str | Path) -> list[tuple[dict, torch.Tensor]]:
    root = Path(recon_dir)
    path = root / "recon.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no reconstructions in {recon_dir} (run `attacker run --out {recon_dir}` first)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r, torch.from_numpy(np.load(root / r["file"], allow_pickle=False))) for r in rows]


def private_requests(test_set: Dataset, eval_batch_size: int) -> list[torch.Tensor]:
    """The private images of each inference request, in request-id order."""
    return [x for x, _ in DataLoader(test_set, batch_size=eval_batch_size)]


def align(reconstructions: list[tuple[dict, torch.Tensor]],
          truth_by_session: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (reconstruction, truth) pairs of the inference requests the harness can place."""
    recon, truth = [], []
    for row, images in reconstructions:
        requests = truth_by_session.get(row["session_id"])
        if row["method"] != "Infer" or requests is None or row["step_id"] >= len(requests):
            continue
        expected = requests[row["step_id"]]
        if expected.shape != images.shape:
            raise ValueError(f"request {row['step_id']} of session {row['session_id']}: reconstruction "
                             f"{list(images.shape)} vs private images {list(expected.shape)}")
        recon.append(images)
        truth.append(expected)
    if not recon:
        raise ValueError("no reconstruction matches a known inference request (wrong --edge-report?)")
    return torch.cat(recon), torch.cat(truth)


def score(recon: torch.Tensor, truth: torch.Tensor, method: str) -> dict:
    return {**metrics.score(recon, truth), "n_images": len(recon), "method": method,
            "ssim_convention": metrics.SSIM_CONVENTION}
