"""What an edge trainer needs from a cloud, whichever side of a socket it is on.

`edge_client.remote.RemoteCloud` implements it over gRPC; `cloud_server.local.LocalCloud`
implements it in-process (the single-process baseline). The trainer depends only on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import torch

from splitnet.models import OptimSpec, SplitModel


@dataclass
class StepReply:
    """A `TrainResult` on either end (`splitnet.serde` converts): the trainer takes the gradient and the
    figures, the edge's connection the step ids it replays and acknowledges by."""

    grad: torch.Tensor | None  # None: the server had applied this step before and no longer has its reply
    loss: float
    correct: int
    duplicate: bool
    lr: float = 0.0  # the rate the decoder stepped with (0 when it did not step)
    step_id: int = 0
    job_steps_applied: int = 0
    durable_step_id: int = 0  # the last step id of this client that a written checkpoint holds
    # U-shaped split: the middle's output for the step's features (the answer to its first half, or kept
    # with a duplicate's gradient); None otherwise
    output: torch.Tensor | None = None


class NotDurable(RuntimeError):
    """The cloud did not confirm that the steps applied so far survive a crash (its Flush timed
    out, failed to write, or the cloud was unreachable): an edge state written now could be ahead
    of the server's checkpoint, and a crash of both ends would leave it unresumable."""


class Cloud(Protocol):
    bytes_up: int
    bytes_down: int
    rtt_ms: list[float]
    reconnects: int
    replayed_steps: int
    session_id: str
    session_ids: Sequence[str]  # every session id it had, oldest first (a reconnect opens a new session)

    def open(self, job: str, client_id: str, split: SplitModel, optim: OptimSpec, grad_codec: str,
             seed: int, init_job: str = "") -> int:
        """Open or re-join a session; return the last step id already applied for this client.
        `init_job`: a new job's decoder starts from that job's trained weights."""

    def submit(self, step_id: int, features: torch.Tensor, labels: torch.Tensor, codec_name: str,
               channels: Sequence[int] | None = None) -> None:
        """Send a training step; its reply is fetched by `collect`, in step order. `channels`: only
        these channels of the features travel, the others being zero (`splitnet.codec.encode`)."""

    def collect(self, step_id: int) -> StepReply: ...

    def forward(self, step_id: int, features: torch.Tensor, codec_name: str,
                channels: Sequence[int] | None = None) -> StepReply:
        """A U-shaped step's first half, lock-step: the reply's `output` is the middle's output (or, for a
        step the cloud applied before, a duplicate with its kept gradient and output)."""

    def backward(self, step_id: int, output_grad: torch.Tensor, codec_name: str) -> StepReply:
        """Its second half: dLoss/d(output) in `codec_name`; the reply carries dLoss/dfeatures."""

    def hold_replies_after(self, step_id: int) -> None:
        """Acknowledge no reply after `step_id`, so that the cloud keeps them: an edge that restarts
        from its state of that step re-sends the later steps and must get their gradients again."""

    def flush(self, strict: bool = False) -> int:
        """Once every reply is collected: have the cloud make the steps applied so far survive
        a crash; return the last step id that does (0: none). Where the cloud does not answer,
        `strict` raises NotDurable instead of returning the last id it confirmed."""

    def infer(self, batches: Iterable[torch.Tensor], codec_name: str,
              channels: Sequence[int] | None = None) -> Iterator[torch.Tensor]: ...

    def close(self) -> None: ...
