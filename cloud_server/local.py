"""The cloud in the edge's own process: the single-process baseline.

It drives the same `Job` the server does, minus gRPC and the codec, so a comparison
with `RemoteCloud` measures transport and nothing else.
"""

from __future__ import annotations

import torch

from cloud_server.job import Job
from splitnet.cloud_api import StepReply
from splitnet.models import OptimSpec, SplitModel


class LocalCloud:
    bytes_up = bytes_down = reconnects = replayed_steps = 0
    session_id = "local"
    session_ids = ("local",)

    def __init__(self) -> None:
        self.job: Job | None = None
        self.rtt_ms: list[float] = []
        self._replies: dict[int, StepReply] = {}

    def open(self, job: str, client_id: str, split: SplitModel, optim: OptimSpec, grad_codec: str, seed: int) -> int:
        self.job = Job(job, split.spec, optim, seed=seed)
        self.job.set_schedule(client_id, optim.schedule)
        self._client = client_id
        return 0

    def submit(self, step_id: int, features: torch.Tensor, labels: torch.Tensor, codec_name: str) -> None:
        # received=step_id: the reply never crosses a network here, so the job need keep none for a re-send
        out = self.job.train_step(self._client, step_id, features, labels, step_id)  # type: ignore[union-attr]
        self._replies[step_id] = StepReply(out.grad, out.loss, out.correct, out.duplicate, out.lr)

    def collect(self, step_id: int) -> StepReply:
        return self._replies.pop(step_id)

    def flush(self) -> int:
        return 0  # nothing of an in-process job outlives the process

    def infer(self, batches, codec_name: str):
        for features in batches:
            yield self.job.infer(features)  # type: ignore[union-attr]

    def close(self) -> None:
        pass
