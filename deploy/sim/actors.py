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
from deploy.sim.fedavg import fedavg
from deploy.sim.config import RayRunConfig
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer
from splitnet import data, serde
from splitnet.cli_util import set_threads, setup_logging

log = logging.getLogger("deploy.ray")

# What each client entry of the report carries from its trainer's report (README keys).
CLIENT_KEYS = ("test_accuracy", "train_loss", "epochs", "steps", "train_samples", "bytes_up", "bytes_down",
               "samples_per_second", "rtt_ms_p50", "rtt_ms_p99", "reconnects", "duplicate_steps", "resent_steps",
               "lr_mismatch_steps", "durable")
# Where each client ran (keys of its entry): its Ray node's id and IP address.
NODE_KEYS = ("node_id", "node_ip")


def running_on() -> dict[str, str]:
    """The Ray node of the calling actor, asked inside it: the report says where each client ran,
    so a user can see whether `SPREAD` did spread the clients over the cluster."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def cluster_nodes() -> list[dict]:
    """The cluster's alive nodes as a run starts (the report's `ray_nodes`): what the clients could
    be spread over, beside where they went."""
    return [{"node_id": n["NodeID"], "node_ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0.0)}
            for n in ray.nodes() if n["Alive"]]


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
class _Client:
    index: int
    client_id: str
    shard_size: int
    handle: ActorHandle
    node: dict = field(default_factory=dict)  # where its actor runs (`running_on`), once its session is open
    progress: dict = field(default_factory=dict)  # the last counters it returned
    report: dict | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class ServerView:
    """The job as the cloud server counts it (Stats), through a channel of the driver's own."""

    def __init__(self, connection: ConnectionConfig, job: str) -> None:
        self.cloud, self.job = RemoteCloud(connection), job

    def stats(self) -> serde.JobStats:
        return next((j for j in self.cloud.stats().jobs if j.job == self.job), serde.JobStats(self.job))

    def close(self) -> None:
        self.cloud.close()


class _Run:
    """One run's clients, rounds and shared encoder, driven from the Ray driver."""

    def __init__(self, config: RayRunConfig) -> None:
        self.config = config
        self.server = ServerView(config.edge.connection, config.edge.job)
        self.clients: list[_Client] = []
        self.rounds: list[dict] = []
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
            self.clients.append(_Client(i, client.client_id, len(shard), handle))
        # The first session of a new job fixes the decoder (and its seed): client 0 opens first.
        nodes = {**self.gather(self.clients[:1], "open"), **self.gather(self.clients[1:], "open")}
        for index, node in nodes.items():
            self.clients[index].node = node
        first = self.live()[:1]
        self.shared = self.gather(first, "encoder_state").get(first[0].index) if first else None
        return partition.label_skew(labels, shards)

    def live(self) -> list[_Client]:
        return [c for c in self.clients if c.ok]

    def gather(self, clients: list[_Client], method: str, args: tuple = (), round_: int = 0) -> dict[int, Any]:
        """Call `method` on every client at once; results by client index, failures recorded."""
        refs = {c.index: getattr(c.handle, method).remote(*args) for c in clients}
        kill = self.config.kill
        if kill and kill.round == round_ and method == "train_round" and kill.client in refs:
            self._kill_mid_round(self.clients[kill.client])
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
        self.server.close()

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

    def _kill_mid_round(self, client: _Client) -> None:
        """Kill `client` once the server has applied one of its steps of this round (or after a deadline)."""
        start = client.progress.get("steps", 0)
        deadline = time.monotonic() + self.config.edge.connection.deadline_s
        while self.server.stats().client_last_step.get(client.client_id, 0) <= start and time.monotonic() < deadline:
            time.sleep(0.02)
        log.warning("fault injection: killing client %d (%s)", client.index, client.client_id)
        ray.kill(client.handle, no_restart=True)

    def _fail(self, client: _Client, err: ray.exceptions.RayError) -> None:
        client.error = error_text(err)
        log.error("client %d (%s) failed: %s", client.index, client.client_id, client.error)
        ray.kill(client.handle, no_restart=True)

    def _record(self, results: dict[int, Any]) -> None:
        for index, progress in results.items():
            self.clients[index].progress = progress

    def _log_round(self, round_: int, seconds: float, before: dict[int, int]) -> None:
        samples = sum(c.progress.get("train_samples", 0) - before[c.index] for c in self.clients)
        losses = [c.progress["train_loss"] for c in self.live() if c.progress.get("train_loss") is not None]
        entry = {"round": round_, "seconds": seconds, "samples": samples,
                 "samples_per_second": samples / seconds if seconds else 0.0, "clients_ok": len(self.live()),
                 "train_loss": sum(losses) / len(losses) if losses else None}
        self.rounds.append(entry)
        log.info("round %d/%d (%s): %d/%d clients ok, %d samples in %.1f s = %.0f samples/s, loss %s", round_,
                 self.config.edge.epochs, self.config.mode, entry["clients_ok"], len(self.clients), samples, seconds,
                 entry["samples_per_second"], f"{entry['train_loss']:.4f}" if losses else "-")


def error_text(err: ray.exceptions.RayError) -> str:
    """A client's failure in one line: the trainer's own exception, or why Ray lost the actor."""
    cause = getattr(err, "cause", None) or err  # RayTaskError wraps the trainer's own exception
    # Ray's actor errors put the reason ("killed by `ray.kill`", "OOM", ...) on a line of its
    # own after indented details (actor id, pid, ...): keep the unindented lines.
    text = " ".join(line for line in str(cause).strip().splitlines() if line[:1] not in ("\t", " "))
    return f"{type(cause).__name__}: {text[:500]}"


def run_clients(config: RayRunConfig) -> dict:
    """Train `config.clients` edge clients on an initialised Ray; the run's JSON report.

    The report's `server_steps_applied` is how many steps the server applied to the
    job's decoder during the run (a Stats difference, so other users of the same job
    would be counted too) and `client_steps_sent` the sum of the steps the clients last
    reported sending. Each step id is applied exactly once, and a step the server reports
    as a duplicate is one it had already applied, so the two agree unless a client died
    between sending steps and reporting them (its entry's `server_last_step` then says
    how far the server got with it).
    """
    nodes = cluster_nodes()
    if config.virtual:
        from deploy.sim.virtual import run_virtual

        return run_virtual(config, nodes)
    started = time.perf_counter()
    run = _Run(config)
    try:
        before = run.server.stats().steps_applied
        skew = run.start()
        log.info("%d clients (%s, %s partition, label skew %.3f) on job %r at %s", config.clients, config.mode,
                 config.partition, skew, config.edge.job, config.edge.connection.server)
        run.train()
        run.finish()
        job = run.server.stats()
    finally:
        run.stop()
    return _report(run, skew, job.steps_applied - before, dict(job.client_last_step), time.perf_counter() - started,
                   nodes)


def _report(run: _Run, skew: float, server_steps: int, last_steps: dict[str, int], wall: float,
            nodes: list[dict]) -> dict:
    entries = []
    for c in run.clients:
        source = c.report or c.progress
        entries.append({"client_id": c.client_id, "index": c.index, "shard_size": c.shard_size,
                        "status": "ok" if c.ok else "failed", "error": c.error or None,
                        "server_last_step": last_steps.get(c.client_id, 0),
                        **{k: source.get(k) for k in CLIENT_KEYS}, **{k: c.node.get(k) for k in NODE_KEYS}})
    return report(run.config, entries, run.rounds, skew, server_steps, wall, nodes)


def report(config: RayRunConfig, entries: list[dict], rounds: list[dict], skew: float, server_steps: int,
           wall: float, nodes: list[dict], **extra) -> dict:
    """The run's report (keys in docs/DEPLOY.md): aggregates, `rounds`, and `client_reports`, one entry
    a client, which `split-ray --report` writes beside the rest as JSON lines."""
    ok = [e for e in entries if e["status"] == "ok"]
    train_seconds = sum(r["seconds"] for r in rounds)
    samples = sum(r["samples"] for r in rounds)
    accuracies = [e["test_accuracy"] for e in ok if e["test_accuracy"] is not None]
    edge = config.edge
    return {
        "mode": config.mode,
        "clients": config.clients,
        **extra,
        "partition": str(config.partition),
        "label_skew": skew,
        "test_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "shared_encoder": config.mode != "parallel",
        "clients_ok": len(ok),
        "failed": [e["client_id"] for e in entries if e["status"] == "failed"],
        "bytes_up": sum(e["bytes_up"] or 0 for e in entries),
        "bytes_down": sum(e["bytes_down"] or 0 for e in entries),
        "train_samples": samples,
        "samples_per_second": samples / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "server_steps_applied": server_steps,
        "client_steps_sent": sum(e["steps"] or 0 for e in entries),
        "job": edge.job,
        "server": edge.connection.server,
        "dataset": edge.data.name,
        "arch": edge.arch,
        "epochs": edge.epochs,
        "lr_schedule": edge.lr_schedule,
        "batch_size": edge.batch_size,
        "codec": edge.codec,
        "seed": edge.seed,
        "ray_nodes": nodes,
        "rounds": rounds,
        "client_reports": entries,
    }
