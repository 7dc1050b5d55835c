"""Many virtual clients over a few Ray workers: `split-ray --clients N --workers W`.

One actor per client (`deploy.sim.actors`) costs a process each, with torch, a copy of
the data and a gRPC channel: several hundred MB, so a machine holds tens of clients, not
thousands. Here W worker actors run the turns of N virtual clients, as Flower's
simulation engine multiplexes its clients over a pool of actors. Between its turns a
client is a `TrainerState` (step counter, data position, random generators, counters, and
its own encoder and momentum where the mode keeps one per client) in Ray's object store,
or a file in `--spill-dir`, plus its id and shard in the driver. The worker that runs a
turn builds a trainer for that client, restores its state, opens a session under the
client's own id over the worker's one channel, trains, has the server checkpoint the
steps, closes the session and hands the state back. Memory grows with W; each of the N
clients costs its state and a few hundred bytes of the server's bookkeeping.

Each round a seeded sample of the clients takes part (`--fraction`, at least
`--min-clients`), drawn before the run so that each client's learning-rate schedule spans
exactly the turns it will get. A turn is one local epoch or `--local-steps` steps. Over a
round's participants the modes mean what they mean with one actor per client:
- `sequential`: one turn after another, each starting from the encoder the last one ended with;
- `parallel`: up to W turns at once; every client keeps its own encoder (in its state);
- `splitfed`: like parallel, from the shared encoder; then FedAvg of the participants'
  encoders weighted by the samples each trained, folded in as their turns end, and the
  average's batch-norm statistics measured by the participants on their shards.

Failures: a call that fails (its worker died, or the trainer raised) runs again once, on
another worker, from the state its client had before it. A turn's steps then go out
again under the same step ids, and the server, which applies each client's step ids once,
answers those it had already applied as duplicates. A second failure marks the client
failed (the report says why) and it takes no further part. A dead worker is replaced; the
replacement takes calls once it has started (where its node died, Ray may hold it pending).

`deploy.sim.run.run_clients` drives this engine's `VirtualRun` (what it shares with the
engine of one actor per client is `deploy.sim.bookkeeping`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import ray
import torch
from ray.actor import ActorHandle
from torch.utils.data import Subset
from tqdm import tqdm

from deploy.sim import partition
from deploy.sim.bookkeeping import ClientRecord, Run, detected_at, error_text, running_on
from deploy.sim.config import RayRunConfig
from deploy.sim.fedavg import FedAvg
from edge_client.config import EdgeConfig
from edge_client.remote import RemoteCloud, open_channel
from edge_client.trainer import EdgeTrainer, TrainerState
from splitnet import data
from splitnet.cli_util import set_threads, setup_logging
from splitnet.tracking import Tracker

log = logging.getLogger("deploy.ray")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientSpec:
    """Who a virtual client is: what a worker needs besides its state to run its turn."""

    index: int
    client_id: str
    seed: int
    indices: list[int]  # its shard of the training set
    turns: int  # its turns in the whole run, which its schedule spans


class Worker:
    """The body of one worker actor: the data once, one gRPC channel, one client's trainer at a time."""

    def __init__(self, config: EdgeConfig, threads: int, keep_encoder: bool, spill_dir: str) -> None:
        setup_logging()
        # a worker runs thousands of turns: their epoch lines would drown the driver's round lines
        logging.getLogger("edge_client.trainer").setLevel(logging.WARNING)
        set_threads(threads)
        self.config, self.keep_encoder, self.spill_dir = config, keep_encoder, spill_dir
        self.splits = data.load(config.data)
        self.channel = open_channel(config.connection)
        self.answered = False  # whether the server has opened a session over the channel yet
        self.node = running_on()  # goes with every turn's counters: the client's row says where it last ran

    def initial_encoder(self, client: ClientSpec) -> State:
        """Open `client`'s session before anyone else's (the first session of a new job fixes the
        decoder and its seed); its initial encoder is every client's."""
        trainer = self._trainer(client)
        self._open(trainer)
        trainer.close()
        return trainer.encoder_state()

    def train(self, client: ClientSpec, state: TrainerState | str | None,
              encoder: State | None) -> tuple[dict, TrainerState | str, State | None]:
        """One turn from `state` (None: the client's first), starting from `encoder` if given: its
        counters, its new state, and its encoder where the client does not keep its own."""
        trainer = self._trainer(client, state)
        if encoder is not None:
            trainer.load_encoder_state(encoder)
        samples = trainer.samples
        self._open(trainer)
        try:
            record = trainer.train_epoch()
            trainer.make_durable()
        finally:
            trainer.close()
        new = trainer.snapshot(encoder=self.keep_encoder)
        counters = {**trainer.counters(), "train_loss": record.get("train_loss"), "turn_samples": trainer.samples - samples,
                    "state_bytes": len(pickle.dumps(new, protocol=pickle.HIGHEST_PROTOCOL)), **self.node}
        return counters, self._store(client, new), None if self.keep_encoder else trainer.encoder_state()

    def recalibrated(self, client: ClientSpec, encoder: State) -> State:
        """The batch-norm statistics (the buffers) of `encoder`, measured on the client's shard."""
        trainer = self._trainer(client)
        trainer.load_encoder_state(encoder)
        trainer.recalibrate_batch_norm()
        return {name: b.detach().clone() for name, b in trainer.encoder.named_buffers()}

    def evaluate(self, client: ClientSpec, state: TrainerState | str | None, encoder: State | None) -> dict:
        """Test accuracy through the client's own session, with its own encoder or `encoder`; its counters.

        A client's own encoder (parallel) first measures its batch-norm statistics on its shard:
        its running statistics moved only in its own steps, a few per turn and a turn every few
        rounds (a client of 100 at --fraction 0.2 trains 10 steps in 50 rounds), so with
        momentum 0.1 they still lean on the initial ones and eval mode normalises by numbers
        that describe none of its weights (measured: 0.20 test accuracy, 0.90 after measuring).
        The shared encoder's were measured for it (splitfed) or have seen every turn."""
        trainer = self._trainer(client, state)
        if encoder is not None:
            trainer.load_encoder_state(encoder)
        if self.keep_encoder:
            trainer.recalibrate_batch_norm()
        self._open(trainer)
        try:
            accuracy = trainer.evaluate()
        finally:
            trainer.close()
        return {**trainer.counters(), "test_accuracy": accuracy, **self.node}

    def _trainer(self, client: ClientSpec, state: TrainerState | str | None = None) -> EdgeTrainer:
        config = dataclasses.replace(self.config, client_id=client.client_id, seed=client.seed,
                                     epochs=max(1, client.turns))
        trainer = EdgeTrainer(config, RemoteCloud(config.connection, self.channel, mid_run=self.answered),
                              self.splits, Subset(self.splits.train, client.indices))
        if isinstance(state, str):
            state = TrainerState(**torch.load(state, weights_only=True))
        if state is not None:
            trainer.restore(state)
        return trainer

    def _open(self, trainer: EdgeTrainer) -> None:
        """Open the turn's session. Once the server has answered this worker, a server that does not is
        one that went away mid-run: waited for --reconnect-seconds, as a step of the turn would be, not
        the --connect-seconds of a first connection."""
        trainer.open(own_count=True)
        self.answered = True

    def _store(self, client: ClientSpec, state: TrainerState) -> TrainerState | str:
        """The state itself (into the object store), or the file it was written to in the spill folder:
        one per turn, named by its step count, so that a turn run again starts from the file before it."""
        if not self.spill_dir:
            return state
        path = Path(self.spill_dir) / f"{client.client_id}.{state.step_id}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(vars(state), tmp)
        os.replace(tmp, path)
        return str(path)


@dataclass
class VirtualClient(ClientRecord):
    """A virtual client as the driver keeps it between its turns: who it is, and its state."""

    spec: ClientSpec
    state: Any = None  # ObjectRef of its TrainerState, or its file in the spill folder; None before its first turn
    counters: dict = field(default_factory=dict)  # as its last call returned them (with where it ran)
    turns_done: int = 0
    retries: int = 0

    def figures(self) -> dict:
        return self.counters

    def engine_keys(self) -> dict:
        return {"turns": self.turns_done, "retries": self.retries}


@dataclass
class _Call:
    client: VirtualClient
    method: str
    args: tuple
    returns: int = 1
    failed_on: tuple[int, int] | None = None  # (worker slot, its generation) where the first attempt failed


class _Pool:
    """The worker actors: each call runs on a free worker; a dead worker is replaced, and a failed
    call runs once more, on another worker where there is one.

    A replacement takes calls only once it has started: where nothing can hold it (its node died,
    and no other has a free CPU), Ray keeps it pending until a node can, and the calls go to the
    workers that are running meanwhile instead of waiting on it (a run over two nodes whose worker
    node died carries on on the other)."""

    def __init__(self, size: int, start: Callable[[], ActorHandle]) -> None:
        self._start = start
        self.workers = [start() for _ in range(size)]
        self._generation = [0] * size  # a replaced worker is another worker
        self._starting: dict[int, ray.ObjectRef] = {}  # slot -> its replacement's readiness, until it has started
        self.replaced = 0

    def run(self, calls: Iterable[_Call], limit: int,
            started: Callable[[_Call, ActorHandle], None] | None = None) -> Iterator[tuple[_Call, Any, list, str]]:
        """Run `calls`, at most `limit` at once; yield (call, first result, its refs, "") as each
        ends, or (call, None, [], error) for one that failed twice."""
        queue, running, idle = deque(calls), {}, list(range(len(self.workers)))
        while queue or running:
            while queue and len(running) < limit:
                slot = self._slot_for(queue[0], [s for s in idle if s not in self._starting])
                if slot is None:
                    break
                call = queue.popleft()
                idle.remove(slot)
                refs = getattr(self.workers[slot], call.method).options(num_returns=call.returns).remote(*call.args)
                refs = list(refs) if call.returns > 1 else [refs]
                running[refs[0]] = (call, slot, refs)
                if started:
                    started(call, self.workers[slot])
            starting = {ref: slot for slot, ref in self._starting.items()}
            (ready,), _ = ray.wait([*running, *starting], num_returns=1)
            if ready in starting:
                self._started(starting[ready])
                continue
            call, slot, refs = running.pop(ready)
            idle.append(slot)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayError as err:
                where = (slot, self._generation[slot])
                if isinstance(err, ray.exceptions.RayActorError):
                    self._replace(slot)
                call.client.detected_at_step = detected_at(err)
                if call.failed_on is None and call.client.detected_at_step is None:  # a detection is no fault
                    call.failed_on = where
                    call.client.retries += 1
                    log.warning("client %s: %s failed (%s); running it again on another worker",
                                call.client.client_id, call.method, error_text(err))
                    queue.appendleft(call)
                    continue
                yield call, None, [], error_text(err)
                continue
            yield call, result, refs, ""

    def _slot_for(self, call: _Call, idle: list[int]) -> int | None:
        """A free started worker for `call`: one other than where it failed, or, where no other
        worker has started (one worker, or the others' replacements pending for a node that died),
        the one it failed on. None: wait for a running one to free up."""
        others = [s for s in idle if (s, self._generation[s]) != call.failed_on]
        if others:
            return others[0]
        started = [s for s in range(len(self.workers))
                   if s not in self._starting and (s, self._generation[s]) != call.failed_on]
        return idle[0] if idle and not started else None

    def _replace(self, slot: int) -> None:
        ray.kill(self.workers[slot], no_restart=True)
        self.workers[slot] = self._start()
        self._generation[slot] += 1
        self._starting[slot] = self.workers[slot].__ray_ready__.remote()
        self.replaced += 1

    def _started(self, slot: int) -> None:
        """The replacement in `slot` has started (it takes calls from now on), or died starting (replaced)."""
        try:
            ray.get(self._starting.pop(slot))
        except ray.exceptions.RayActorError as err:
            log.warning("a replacement worker died as it started (%s); starting another", error_text(err))
            self._replace(slot)

    def stop(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)


class VirtualRun(Run):
    """One run's virtual clients, rounds and shared encoder, driven from the Ray driver: a pool of workers."""

    def __init__(self, config: RayRunConfig) -> None:
        assert config.virtual is not None
        super().__init__(config)
        self.virtual = config.virtual
        self.participants = config.participants()
        self.clients: list[VirtualClient] = []
        self.shared: ray.ObjectRef | None = None  # the encoder the next turn starts from (all but parallel)
        self.initial: ray.ObjectRef | None = None  # client 0's initial encoder: every client's first
        self.pool: _Pool | None = None
        self.tracker = Tracker(config.edge.log_dir)
        self._round = 0

    def start(self) -> float:
        """Partition, start the workers, open client 0's session first; the partition's label skew."""
        cfg, edge = self.config, self.config.edge
        labels = partition.labels_of(data.load(edge.data).train)
        shards = partition.split(labels, cfg.clients, cfg.partition, edge.seed)
        turns = [0] * cfg.clients
        for taking_part in self.participants:
            for index in taking_part:
                turns[index] += 1
        run_id = uuid.uuid4().hex[:6]  # fresh ids: a re-run against a long-lived server starts at step 1
        ids = [f"ray-{run_id}-{i}" for i in range(len(shards))]
        self.clients = [VirtualClient(i, ids[i], len(shard), ClientSpec(i, ids[i], edge.seed + i, shard, turns[i]))
                        for i, shard in enumerate(shards)]
        workers = self.virtual.workers or self._cpu_workers()
        cpus = cfg.cpus_per_client or min(1.0, ray.cluster_resources().get("CPU", 1.0) / workers)
        # each turn builds its trainer from the settings, with its client's id, seed and turns
        worker_config = dataclasses.replace(edge, epoch_steps=self.virtual.local_steps, progress=False, log_dir="")
        actor = ray.remote(Worker).options(num_cpus=cpus, scheduling_strategy="SPREAD")
        self.pool = _Pool(workers, lambda: actor.remote(worker_config, cfg.threads, cfg.mode == "parallel",
                                                        self.virtual.spill_dir))
        log.info("%d virtual clients over %d workers (%s, %d a round, %s a turn)", cfg.clients, workers, cfg.mode,
                 len(self.participants[0]),
                 f"{self.virtual.local_steps} steps" if self.virtual.local_steps else "one local epoch")
        first = self.clients[0]
        for call, result, refs, error in self.pool.run([_Call(first, "initial_encoder", (first.spec,))], 1):
            if error:
                raise RuntimeError(f"client 0 could not open the job's first session: {error}")
            self.initial = self.shared = refs[0]
        return partition.label_skew(labels, shards)

    def _cpu_workers(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1.0) // (self.config.cpus_per_client or 1.0)))

    def train(self) -> None:
        rounds = len(self.participants)
        bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not self.config.edge.progress)
        for self._round, taking_part in enumerate(self.participants, 1):
            clients = [self.clients[i] for i in taking_part if self.clients[i].ok]
            start = time.perf_counter()
            done: list[dict] = []

            def progress(counters: dict) -> None:
                done.append(counters)
                bar.set_postfix(turns=f"{len(done)}/{len(clients)}")

            if self.config.mode == "splitfed":
                self._splitfed(clients, progress)
            else:
                self._turns(clients, progress)
            self._log_round(time.perf_counter() - start, done, len(clients))
            bar.update(1)
        bar.close()

    def _turns(self, clients: list[VirtualClient], progress: Callable[[dict], None]) -> None:
        """Sequential: one at a time, passing the encoder on; parallel: up to W at once, each its own."""
        if self.config.mode == "sequential":
            for client in clients:
                for counters, refs in self._train([client], 1, lambda c: self.shared):
                    self.shared = refs[2]  # a client that failed passes nothing on: the next starts where it did
                    progress(counters)
        else:
            for counters, _ in self._train(clients, len(self.pool.workers), lambda c: self.initial if c.state is None
                                           else None):
                progress(counters)

    def _splitfed(self, clients: list[VirtualClient], progress: Callable[[dict], None]) -> None:
        """Parallel turns from the shared encoder, averaged as they end (weighted by the samples each
        trained), then the average's batch-norm statistics measured on the participants' shards and
        pooled (measured from scratch: the pooled batch count is the sum of theirs)."""
        base = ray.get(self.shared)
        mean = FedAvg(base)
        for counters, refs in self._train(clients, len(self.pool.workers), lambda c: self.shared):
            if counters["turn_samples"]:
                mean.add(ray.get(refs[2]), counters["turn_samples"])
            progress(counters)
        if not mean.total:
            return
        averaged = ray.put(mean.result())
        calls = [_Call(c, "recalibrated", (c.spec, averaged)) for c in clients if c.ok]
        measured = None
        for call, buffers, _, error in self.pool.run(calls, len(self.pool.workers)):
            if error:
                self.fail(call.client, f"batch-norm measurement: {error}")
                continue
            if measured is None:
                measured = FedAvg({k: v if v.is_floating_point() else torch.zeros_like(v) for k, v in buffers.items()})
            measured.add(buffers, len(call.client.spec.indices))
        self.shared = ray.put({**ray.get(averaged), **measured.result()} if measured else ray.get(averaged))

    def _train(self, clients: list[VirtualClient], limit: int,
               encoder: Callable[[VirtualClient], Any]) -> Iterator[tuple[dict, list]]:
        """Each client's turn, from its state and `encoder(client)`; yields (counters, refs) as turns end."""
        calls = [_Call(c, "train", (c.spec, c.state, encoder(c)), returns=3) for c in clients]
        for call, counters, refs, error in self.pool.run(calls, limit, self._maybe_kill):
            client = call.client
            if error:
                self.fail(client, error)
                continue
            self._keep_state(client, refs[1])
            client.counters, client.turns_done = counters, client.turns_done + 1
            yield counters, refs

    def _keep_state(self, client: VirtualClient, ref: ray.ObjectRef) -> None:
        if not self.virtual.spill_dir:
            client.state = ref
            return
        old, client.state = client.state, ray.get(ref)
        if old and old != client.state:
            Path(old).unlink(missing_ok=True)

    def finish(self) -> None:
        """Shared encoder: one evaluation, by the first live client; parallel: every live client its own."""
        live = [c for c in self.clients if c.ok]
        if not live:
            return
        if self.config.mode == "parallel":
            calls = [_Call(c, "evaluate", (c.spec, c.state, self.initial if c.state is None else None)) for c in live]
        else:
            calls = [_Call(live[0], "evaluate", (live[0].spec, live[0].state, self.shared))]
        for call, counters, _, error in self.pool.run(calls, len(self.pool.workers)):
            if error:
                self.fail(call.client, f"evaluation: {error}")
            else:  # the evaluation's bytes added, the last turn's figures kept
                call.client.counters = {**call.client.counters, **counters}
        if self.config.mode != "parallel" and live[0].ok:
            accuracy = live[0].counters["test_accuracy"]
            for c in live:
                c.counters["test_accuracy"] = accuracy
        accuracies = [c.counters["test_accuracy"] for c in live if c.ok]
        if accuracies:
            self.tracker.scalars(len(self.rounds), {"test/accuracy": sum(accuracies) / len(accuracies)})

    def stop(self) -> None:
        if self.pool:
            self.pool.stop()
        self.tracker.close()
        super().stop()

    def report_keys(self) -> dict:
        """The pool's figures: workers, sampling, retries, the states' size and where they were kept."""
        sizes = [c.counters["state_bytes"] for c in self.clients if "state_bytes" in c.counters]
        return {"workers": len(self.pool.workers) if self.pool else 0, "fraction": self.virtual.fraction,
                "min_clients": self.virtual.min_clients, "local_steps": self.virtual.local_steps,
                "retries": sum(c.retries for c in self.clients),
                "workers_replaced": self.pool.replaced if self.pool else 0,
                "state_bytes_mean": sum(sizes) / len(sizes) if sizes else None,
                "state_store": self.virtual.spill_dir or "object store"}

    def _maybe_kill(self, call: _Call, worker: ActorHandle) -> None:
        """Fault injection: kill the worker running the victim's turn once the server has applied one of its
        steps (or after a deadline); the turn then runs again on another worker."""
        client = call.client
        if call.failed_on is None and self.is_victim(client.index, self._round):
            self.kill_after_a_step(client, client.counters.get("last_step_id", 0), worker,
                                   f"the worker running client {client.index}'s turn ({client.client_id})")

    def _log_round(self, seconds: float, done: list[dict], taking_part: int) -> None:
        samples = sum(c["turn_samples"] for c in done)
        losses = [c["train_loss"] for c in done if c.get("train_loss") is not None]
        entry = self.log_round(self._round, len(self.participants), seconds, samples, losses, len(done), taking_part,
                               "turns", participants=taking_part)
        self.tracker.scalars(self._round, {"train/loss": entry["train_loss"],
                                           "train/samples_per_second": entry["samples_per_second"],
                                           "round/participants": taking_part})

