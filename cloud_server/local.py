"""The cloud in the edge's own process: the single-process baseline.

It drives the same `Job` the server does and passes every tensor through the same
messages and codec the wire carries (features in the step's codec, gradients in the
session's grad codec, logits as fp32, the loss as a float32), minus gRPC. So an in-process
int8 run is an int8 run, step for step what it would be against `cloud-server`, and a
comparison with `RemoteCloud` measures transport and nothing else. The byte counts are the
sizes of those messages, as `RemoteCloud` counts its own.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from cloud_server.job import Job
from cloud_server.servicer import model_mismatch, train_result
from splitnet import codec, serde
from splitnet.cloud_api import StepReply
from splitnet.models import OptimSpec, SplitModel


class LocalCloud:
    reconnects = replayed_steps = 0
    session_id = "local"
    session_ids = ("local",)

    def __init__(self, job: Job | None = None, jobs: dict[str, Job] | None = None) -> None:
        """`job`: one to join, so that several in-process clients share a decoder, as on a server.
        `jobs`: the jobs this process holds by name, as a server does (a job this cloud makes is
        added to it): where `open(..., init_job=NAME)` finds the trained job to start from."""
        self.job = job
        self.jobs = jobs if jobs is not None else {}
        self.rtt_ms: list[float] = []
        self.bytes_up = self.bytes_down = 0
        self._replies: dict[int, StepReply] = {}

    def open(self, job: str, client_id: str, split: SplitModel, optim: OptimSpec, grad_codec: str, seed: int,
             init_job: str = "") -> int:
        self.grad_codec = codec.check_codec(grad_codec, "grad_codec")
        if self.job is None or self.job.name != job:  # as on a server, a re-open joins the job it made
            self.job = self.jobs.get(job) or self._new_job(job, split, optim, seed, init_job)
        self.job.set_schedule(client_id, optim.schedule)
        self._client = client_id
        return self.job.last_step(client_id)

    def _new_job(self, name: str, split: SplitModel, optim: OptimSpec, seed: int, init_job: str) -> Job:
        job = Job(name, split.spec, optim, seed=seed)
        if init_job:
            if init_job not in self.jobs:
                raise ValueError(f"init_job: no job {init_job!r} in this LocalCloud's jobs ({sorted(self.jobs)})")
            mismatch = model_mismatch(self.jobs[init_job], job.spec)
            if mismatch:
                raise ValueError(f"init_job: {mismatch}")
            job.adopt_decoder(self.jobs[init_job])
        self.jobs[name] = job
        return job

    def submit(self, step_id: int, features: torch.Tensor, labels: torch.Tensor, codec_name: str,
               channels: Sequence[int] | None = None) -> None:
        # received_step_id=step_id: the reply never crosses a network here, so the job need keep none
        # for a re-send; and with no checkpoint the last applied step is the durable one, as a server
        # without --checkpoint-dir reports.
        step = serde.TrainStep(self.session_id, step_id, codec.encode(features, codec_name, channels),
                               labels.tolist(), received_step_id=step_id)
        out = self.job.train_step(self._client, step_id, codec.decode(step.features, "features"),  # type: ignore[union-attr]
                                  labels, step.received_step_id)
        result = train_result(step_id, out, step_id, self.grad_codec)
        self._count(serde.train_step_to_proto(step), result)
        self._replies[step_id] = serde.train_result_from_proto(result)

    def collect(self, step_id: int) -> StepReply:
        return self._replies.pop(step_id)

    def forward(self, step_id: int, features: torch.Tensor, codec_name: str,
                channels: Sequence[int] | None = None) -> StepReply:
        step = serde.TrainStep(self.session_id, step_id, codec.encode(features, codec_name, channels), [],
                               received_step_id=step_id)
        out = self.job.forward_step(self._client, step_id, codec.decode(step.features, "features"),  # type: ignore[union-attr]
                                    step.received_step_id)
        return self._reply(step, out)

    def backward(self, step_id: int, output_grad: torch.Tensor, codec_name: str) -> StepReply:
        step = serde.TrainStep(self.session_id, step_id, None, [], received_step_id=step_id,
                               output_grad=codec.encode(output_grad, codec_name))
        out = self.job.backward_step(self._client, step_id, codec.decode(step.output_grad, "output_grad"),  # type: ignore[union-attr,arg-type]
                                     None, step.received_step_id)
        return self._reply(step, out)

    def _reply(self, step: serde.TrainStep, outcome) -> StepReply:
        result = train_result(step.step_id, outcome, self.job.last_step(self._client), self.grad_codec)  # type: ignore[union-attr]
        self._count(serde.train_step_to_proto(step), result)
        return serde.train_result_from_proto(result)

    def hold_replies_after(self, step_id: int) -> None:
        pass  # an in-process job dies with the edge: no restarted edge can ask it for a reply again

    def flush(self, strict: bool = False) -> int:
        return 0  # nothing of an in-process job outlives the process

    def infer(self, batches: Iterable[torch.Tensor], codec_name: str,
              channels: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        for i, features in enumerate(batches):
            request = serde.InferRequest(self.session_id, i, codec.encode(features, codec_name, channels))
            logits = self.job.infer(codec.decode(request.features, "features"))  # type: ignore[union-attr]
            reply = serde.prediction_to_proto(serde.Prediction(i, logits))
            self._count(serde.infer_request_to_proto(request), reply)
            yield serde.prediction_from_proto(reply).logits

    def close(self) -> None:
        pass

    def _count(self, up, down) -> None:
        self.bytes_up += up.ByteSize()
        self.bytes_down += down.ByteSize()
