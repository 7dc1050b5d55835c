"""Many edge clients at once: each a Ray actor with its own data shard and gRPC channel.

Every client is a real edge client (an `EdgeTrainer` over a `RemoteCloud`) built inside
its actor, so N clients are N processes with N gRPC connections to one `cloud-server`,
as they would be on N devices. They share one `--job`, hence one decoder, and each has
its own client id, so the server numbers (and deduplicates) each client's steps apart.

A round is one local epoch of every client. The modes differ only in what happens to
the encoders around a round:
- `sequential`: vanilla split learning (Gupta & Raskar, 2018). Clients take turns; each
  starts from the encoder the previous one finished with, so one encoder is trained on
  every shard in turn, and the clients' CPUs are never busy at the same time.
- `parallel`: all clients train at once against the shared decoder, each keeping its own
  encoder; the decoder sees every client's features interleaved.
- `splitfed`: parallel, then the encoders are averaged (FedAvg, weighted by shard size)
  and every client carries on from the average (Thapa et al., SplitFed, 2022). The
  average's batch-norm statistics are then measured (each client one forward pass over
  its shard, pooled), not averaged: averaged statistics describe none of the encoders.
All clients start from client 0's initial encoder, so the modes differ only in how the
encoders are combined, and FedAvg averages models that share an initialisation.

Failures are per client: an actor that dies (or whose trainer raises) is marked failed
with its error and left out of later rounds and averages; the others carry on.

`deploy.sim.run.run_clients` drives this engine's `ActorRun` (what it shares with the
virtual clients' engine is `deploy.sim.bookkeeping`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.actor import ActorHandle
from torch.utils.data import Subset

from deploy.sim import partition
from deploy.sim.bookkeeping import ClientRecord, Run, detected_at, error_text, running_on
from deploy.sim.config import RayRunConfig
from deploy.sim.fedavg import fedavg
from edge_client.config import EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer
from splitnet import data
from splitnet.cli_util import set_threads, setup_logging

log = logging.getLogger("deploy.ray")


class EdgeClient:
    """The body of one Ray actor: an edge client training on one shard of the training set.

    The trainer and its gRPC channel are created here, inside the actor's process: a
    channel cannot be pickled across processes, and each client must have its own.
    """

    def __init__(self, config: EdgeConfig, indices: list[int], threads: int) -> None:
        setup_logging()
        set_threads(threads)
        splits = data.load(config.data)
        self.trainer = EdgeTrainer(config, RemoteCloud(config.connection), splits, Subset(splits.train, indices))

    def open(self) -> dict[str, str]:
        """Open the client's session; the node this actor runs on."""
        self.trainer.open()
        return running_on()

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return self.trainer.encoder_state()

    def recalibrated(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch-norm statistics (the encoder's buffers) of `state`, measured on this client's shard."""
        self.trainer.load_encoder_state(state)
        self.trainer.recalibrate_batch_norm()
        return {name: b.detach().cpu().clone() for name, b in self.trainer.encoder.named_buffers()}

    def train_round(self, state: dict[str, torch.Tensor] | None) -> dict:
        """One local epoch, from `state` if given; the running counters and the epoch's loss."""
        if state is not None:
            self.trainer.load_encoder_state(state)
        record = self.trainer.train_epoch()
        return {**self.trainer.counters(), "train_loss": record.get("train_loss")}

    def finish(self, state: dict[str, torch.Tensor] | None) -> dict:
        """Wait until the server has checkpointed the last step, evaluate (with `state` if given) through
        the server's Infer, close; the trainer's report."""
        if state is not None:
            self.trainer.load_encoder_state(state)
        try:
            self.trainer.make_durable()
            return self.trainer.report(self.trainer.evaluate())
        finally:
            self.trainer.close()


@dataclass
class ActorClient(ClientRecord):
    """A client as the driver keeps it: its actor, and what the actor last returned."""

    handle: ActorHandle
    node: dict = field(default_factory=dict)  # where its actor runs (`running_on`), once its session is open
    progress: dict = field(default_factory=dict)  # the last counters it returned
    report: dict | None = None

    def figures(self) -> dict:
        return {**(self.report or self.progress), **self.node}


class ActorRun(Run):
    """One run's clients, rounds and shared encoder, driven from the Ray driver: a Ray actor per client."""

    def __init__(self, config: RayRunConfig) -> None:
        super().__init__(config)
        self.clients: list[ActorClient] = []
        self.shared: dict[str, torch.Tensor] | None = None  # the encoder every client starts the next round from

    def start(self) -> float:
        """Partition, create one actor per shard, open their sessions; the partition's label skew."""
        cfg, edge = self.config, self.config.edge
        splits = data.load(edge.data)
        labels = partition.labels_of(splits.train)
        shards = partition.split(labels, cfg.clients, cfg.partition, edge.seed)
        cpus = cfg.cpus_per_client or min(1.0, ray.cluster_resources().get("CPU", 1.0) / cfg.clients)
        run_id = uuid.uuid4().hex[:6]  # fresh ids: a re-run against a long-lived server starts at step 1
        actor = ray.remote(EdgeClient)
        for i, shard in enumerate(shards):
            client = dataclasses.replace(edge, client_id=f"ray-{run_id}-{i}", seed=edge.seed + i, progress=False,
                                         log_dir=edge.log_dir and str(Path(edge.log_dir) / f"client-{i}"))
            # SPREAD: on a cluster the clients go to different machines, as devices would be.
            handle = actor.options(num_cpus=cpus, scheduling_strategy="SPREAD").remote(client, shard, cfg.threads)
            self.clients.append(ActorClient(i, client.client_id, len(shard), handle))
        # The first session of a new job fixes the decoder (and its seed): client 0 opens first.
        nodes = {**self.gather(self.clients[:1], "open"), **self.gather(self.clients[1:], "open")}
        for index, node in nodes.items():
            self.clients[index].node = node
        first = self.live()[:1]
        self.shared = self.gather(first, "encoder_state").get(first[0].index) if first else None
        skew = partition.label_skew(labels, shards)
        log.info("%d clients (%s, %s partition, label skew %.3f) on job %r at %s", cfg.clients, cfg.mode,
                 cfg.partition, skew, edge.job, edge.connection.server)
        return skew

    def gather(self, clients: list[ActorClient], method: str, args: tuple = (), round_: int = 0) -> dict[int, Any]:
        """Call `method` on every client at once; results by client index, failures recorded."""
        refs = {c.index: getattr(c.handle, method).remote(*args) for c in clients}
        victims = [i for i in refs if self.is_victim(i, round_)]
        if victims and method == "train_round":
            self._kill_mid_round(self.clients[victims[0]])
        results = {}
        for c in clients:
            try:
                results[c.index] = ray.get(refs[c.index])
            except ray.exceptions.RayError as err:
                self._fail(c, err)
        return results

    def train(self) -> None:
        mode = self.config.mode
        for round_ in range(1, self.config.edge.epochs + 1):
            start = time.perf_counter()
            before = {c.index: c.progress.get("train_samples", 0) for c in self.clients}
            if mode == "sequential":
                for client in self.live():
                    self._record(self.gather([client], "train_round", (self.shared,), round_))
                    if client.ok:  # a client that died in its turn passes on nothing: the next starts where it did
                        self.shared = self.gather([client], "encoder_state").get(client.index, self.shared)
            else:
                # parallel: every client starts from the common initial encoder, then keeps its own
                state = ray.put(self.shared) if round_ == 1 or mode == "splitfed" else None
                self._record(self.gather(self.live(), "train_round", (state,), round_))
                if mode == "splitfed":
                    self._average()
            self._log_round(round_, time.perf_counter() - start, before)
            if all(c.progress.get("done") for c in self.live()):
                break

    def finish(self) -> None:
        """Each live client evaluates through its own session: the shared encoder, or its own in parallel mode."""
        state = None if self.config.mode == "parallel" else self.shared
        for index, report in self.gather(self.live(), "finish", (state,)).items():
            self.clients[index].report = report

    def stop(self) -> None:
        for client in self.clients:
            ray.kill(client.handle, no_restart=True)
        super().stop()

    def _average(self) -> None:
        """FedAvg of the encoders, then of the batch-norm statistics every client measures for the average.

        Measured every round, not only before the final evaluation: eval mode reads them
        within rounds too (the GMM surrogate's epoch-end refit encodes the shard in eval mode,
        with running statistics still partly those the round started from).
        """
        states = self.gather(self.live(), "encoder_state")
        if states:
            self.shared = fedavg(list(states.values()), [self.clients[i].shard_size for i in states], self.shared)
        measured = self.gather(self.live(), "recalibrated", (ray.put(self.shared),))
        if measured:
            buffers = list(measured.values())
            # measured from scratch: the pooled batch count is the sum of the clients' counts
            base = {k: v if v.is_floating_point() else torch.zeros_like(v) for k, v in buffers[0].items()}
            pooled = fedavg(buffers, [self.clients[i].shard_size for i in measured], base)
            self.shared = {**self.shared, **pooled}

    def _kill_mid_round(self, client: ActorClient) -> None:
        """Kill `client` once the server has applied one of its steps of this round (or after a deadline)."""
        self.kill_after_a_step(client, client.progress.get("steps", 0), client.handle,
                               f"client {client.index} ({client.client_id})")

    def _fail(self, client: ActorClient, err: ray.exceptions.RayError) -> None:
        client.detected_at_step = detected_at(err)
        self.fail(client, error_text(err))
        ray.kill(client.handle, no_restart=True)

    def _record(self, results: dict[int, Any]) -> None:
        for index, progress in results.items():
            self.clients[index].progress = progress

    def _log_round(self, round_: int, seconds: float, before: dict[int, int]) -> None:
        samples = sum(c.progress.get("train_samples", 0) - before[c.index] for c in self.clients)
        losses = [c.progress["train_loss"] for c in self.live() if c.progress.get("train_loss") is not None]
        self.log_round(round_, self.config.edge.epochs, seconds, samples, losses, len(self.live()), len(self.clients),
                       "clients")

