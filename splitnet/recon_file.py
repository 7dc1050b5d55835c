"""The reconstruction folder format: written by `attacker run` and by the hijacking cloud
(`cloud-server --hijack`), read by `attacker score` (`attacks.harness` aligns it with the
private images). Two roles write it, so it is a contract and lives here.

- `recon.jsonl`: one JSON object per reconstructed batch: `seq`, `method` (Train | Infer),
  `session_id`, `step_id`, `file`;
- `recon/NNNNNNNN.npy`: float32 images [N, C, H, W] in [0, 1] (allow_pickle=False);
- `run.json`: the attack's settings and timings (written by whoever attacked).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch


def clear_reconstructions(out: Path) -> None:
    """An empty reconstruction folder (`write_reconstruction` appends to `recon.jsonl`)."""
    shutil.rmtree(out / "recon", ignore_errors=True)
    (out / "recon.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


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
