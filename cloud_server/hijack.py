"""The malicious cloud (`cloud-server --hijack fsha`): an attack tool, for measuring what a lying
server learns and whether an edge notices (docs/ATTACKS_AND_METRICS.md §6).

A `HijackJob` keeps every guarantee of a `Job` (validation, exactly-once steps, kept replies,
limits): only the step's math differs. It still trains the job's decoder on the client's
features (detached), so the loss and accuracy it reports look like training and inference
through the job works; but the gradient it answers with is FSHA's (`splitnet.fsha`), which
does not depend on the labels. The wire format is unchanged: the edge cannot tell from it.

`HijackRecorder` writes the attacker's reconstructions of the private training batches it
sees (every `record_every` steps of a client) in the reconstruction folder format
(`splitnet.recon_file`), which `attacker score` aligns with the private images by the edge's
report, and the attack's own figures per step to `fsha.jsonl`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cloud_server.job import Job
from splitnet import data, recon_file
from splitnet.fsha import FeatureSpaceHijack, FshaSettings, HijackStep
from splitnet.settings import DataSpec


def public_images(spec: DataSpec, split: str) -> torch.Tensor:
    """The server's own images, [N, C, H, W] in [0, 1]: one split of a dataset (for digits, the test
    split is disjoint from every client's training split, which is the other one)."""
    splits = data.load(spec)
    return torch.stack([x for x, _ in (splits.train if split == "train" else splits.test)])


@dataclass
class HijackJob(Job):
    public: torch.Tensor | None = field(default=None, repr=False)
    settings: FshaSettings = field(default_factory=FshaSettings)
    last_attack: HijackStep | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.u_shaped:
            raise ValueError("head_cut: the hijacking cloud (--hijack) runs the vanilla split only")
        if self.public is None:
            raise ValueError("a hijacking job needs the server's public images")
        self.attack = FeatureSpaceHijack(self.spec, self.public, self.settings, self.seed, self.device)

    def _learn(self, client_id: str, step_id: int, features: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, float, int, float]:
        """The honest step trains the decoder (its figures go back as usual); its gradient is dropped for
        the hijacking one."""
        _, loss, correct, lr = super()._learn(client_id, step_id, features, labels)
        self.last_attack = self.attack.step(features)
        return self.last_attack.grad, loss, correct, lr

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.attack.reconstruct(features)


class HijackRecorder:
    """The servicer's step observer in hijack mode: reconstructions and the attack's figures."""

    def __init__(self, out: str, record_every: int, run_info: dict) -> None:
        self.out, self.record_every = Path(out), record_every
        recon_file.clear_reconstructions(self.out)
        (self.out / "fsha.jsonl").unlink(missing_ok=True)
        (self.out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        self._seq = 0
        self._lock = threading.Lock()

    def __call__(self, method, session, step_id, features, wire_dtype, labels) -> None:
        job = session.job
        if method != "Train" or not isinstance(job, HijackJob):
            return
        attack = job.last_attack
        with self._lock:
            if attack is not None:
                with open(self.out / "fsha.jsonl", "a") as f:
                    f.write(json.dumps({"job": job.name, "client_id": session.client_id, "step_id": step_id,
                                        "ae_loss": attack.ae_loss, "critic_loss": attack.critic_loss,
                                        "client_loss": attack.client_loss,
                                        "grad_norm": float(attack.grad.norm())}) + "\n")
            if step_id == 1 or step_id % self.record_every == 0:
                recon_file.write_reconstruction(self.out, self._seq, "Train", session.session_id, step_id,
                                                job.reconstruct(features))
                self._seq += 1


def run_info(public: DataSpec, split: str, settings: FshaSettings, record_every: int) -> dict:
    """`run.json`: what `attacker score` reads (method, and the public data, which it refuses to score on)."""
    return {"method": "fsha", "aux_dataset": public.name, "aux_split": split, "record_every": record_every,
            "settings": asdict(settings)}
