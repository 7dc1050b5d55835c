"""What the two engines of `split-ray` share: the driver's record of each client, a run's rounds,
failures and fault injection, the job as the server counts it, and the run's report.

An engine subclasses `Run` (`deploy.sim.actors`: one Ray actor per client;
`deploy.sim.virtual`: virtual clients over a pool of worker actors) and keeps a
`ClientRecord` of each of its clients; `deploy.sim.run` drives either through the same
steps (start, train, finish, stop) and writes the same report. Neither engine imports
the other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc
import ray
from ray.actor import ActorHandle

from deploy.sim.config import RayRunConfig
from edge_client.config import ConnectionConfig
from edge_client.detect import HijackDetected
from edge_client.remote import RemoteCloud
from splitnet import serde

log = logging.getLogger("deploy.ray")
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

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


def detected_at(err: ray.exceptions.RayError) -> int | None:
    """The step at which the client's hijacking detector stopped it (`edge-client --detect`), if that
    is why it failed: not a fault to run again, a finding to report."""
    cause = getattr(err, "cause", None)
    return cause.detection.get("detected_at_step") if isinstance(cause, HijackDetected) else None


def error_text(err: ray.exceptions.RayError) -> str:
    """A client's failure in one line: the trainer's own exception, or why Ray lost the actor."""
    cause = getattr(err, "cause", None) or err  # RayTaskError wraps the trainer's own exception
    # Ray's actor errors put the reason ("killed by `ray.kill`", "OOM", ...) on a line of its
    # own after indented details (actor id, pid, ...): keep the unindented lines.
    text = " ".join(line for line in str(cause).strip().splitlines() if line[:1] not in ("\t", " "))
    return f"{type(cause).__name__}: {text[:500]}"


class ServerView:
    """The job as the cloud server counts it (Stats), through a channel of the driver's own.

    Once the server has answered, a call that finds it unreachable is tried again for the clients'
    reconnect window (`--reconnect-seconds`), as theirs are: the run's last count comes after the
    clients have finished or failed, and a server that is away for a moment then (a cloud outage that
    failed the clients, a restart) would otherwise cost the whole report, the clients' errors in it.
    The first call is tried once: a wrong --server is reported at once."""

    def __init__(self, connection: ConnectionConfig, job: str) -> None:
        self.cloud, self.job = RemoteCloud(connection), job
        self._answered = False

    def stats(self) -> serde.JobStats:
        deadline = time.monotonic() + self.cloud.config.reconnect_s
        while True:
            try:
                reply = self.cloud.stats()
                break
            except grpc.RpcError as err:
                if not self._answered or err.code() not in _UNREACHABLE or time.monotonic() > deadline:
                    raise
                log.warning("Stats: %s: %s; trying again for up to %g s (--reconnect-seconds)", err.code().name,
                            err.details(), deadline - time.monotonic())
                time.sleep(1.0)
        self._answered = True
        return next((j for j in reply.jobs if j.job == self.job), serde.JobStats(self.job))

    def close(self) -> None:
        self.cloud.close()


@dataclass
class ClientRecord:
    """What the driver keeps of one client, whichever engine runs it; an engine adds its own fields."""

    index: int
    client_id: str
    shard_size: int
    error: str = field(default="", kw_only=True)  # why it failed; empty while it is ok
    detected_at_step: int | None = field(default=None, kw_only=True)  # its detector stopped it there (a hijacker)

    @property
    def ok(self) -> bool:
        return not self.error

    def figures(self) -> dict:
        """Its trainer's latest figures (CLIENT_KEYS) and where it ran (NODE_KEYS), as far as the driver knows."""
        raise NotImplementedError

    def engine_keys(self) -> dict:
        """What the engine adds to the client's entry of the report."""
        return {}

    def entry(self, last_steps: dict[str, int]) -> dict:
        """The client's entry of the report (`client_reports`); `last_steps`: the server's last step of each client."""
        figures = self.figures()
        return {"client_id": self.client_id, "index": self.index, "shard_size": self.shard_size,
                "status": "ok" if self.ok else "failed" if self.detected_at_step is None else "detected",
                "error": self.error or None, "detected_at_step": self.detected_at_step,
                "server_last_step": last_steps.get(self.client_id, 0), **self.engine_keys(),
                **{k: figures.get(k) for k in (*CLIENT_KEYS, *NODE_KEYS)}}


class Run:
    """One run's clients and rounds, driven from the Ray driver: `deploy.sim.run.run_clients` calls
    `start`, `train`, `finish`, then `stop` whatever happened, and reports."""

    def __init__(self, config: RayRunConfig) -> None:
        self.config = config
        self.server = ServerView(config.edge.connection, config.edge.job)
        self.clients: list = []  # the engine's ClientRecords, by index
        self.rounds: list[dict] = []

    def start(self) -> float:
        """Partition the training set, start the actors, open the first session; the partition's label skew."""
        raise NotImplementedError

    def train(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Evaluate through the server: each live client's test accuracy."""
        raise NotImplementedError

    def stop(self) -> None:
        """Let go of the actors (the engine), then of the driver's channel."""
        self.server.close()

    def report_keys(self) -> dict:
        """What the engine adds to the run's report, after the run."""
        return {}

    def live(self) -> list:
        return [c for c in self.clients if c.ok]

    def fail(self, client: ClientRecord, error: str) -> None:
        client.error = error
        log.error("client %d (%s) failed: %s", client.index, client.client_id, error)

    def is_victim(self, index: int, round_: int) -> bool:
        """Whether fault injection (`--kill CLIENT@ROUND`) strikes client `index` in round `round_`."""
        kill = self.config.kill
        return kill is not None and kill.round == round_ and kill.client == index

    def kill_after_a_step(self, client: ClientRecord, start: int, handle: ActorHandle, what: str) -> None:
        """Fault injection: kill the actor `handle` (`what` it is, for the log) once the server has applied a
        step of `client` beyond `start`, so that the kill lands mid-round (or after the connection's deadline)."""
        deadline = time.monotonic() + self.config.edge.connection.deadline_s
        while self.server.stats().client_last_step.get(client.client_id, 0) <= start and time.monotonic() < deadline:
            time.sleep(0.02)
        log.warning("fault injection: killing %s", what)
        ray.kill(handle, no_restart=True)

    def log_round(self, round_: int, rounds: int, seconds: float, samples: int, losses: list[float], ok: int,
                  of: int, unit: str, **keys) -> dict:
        """Record a round in `rounds` (with the engine's `keys`) and log it: `ok` of `of` `unit` ended well."""
        entry = {"round": round_, "seconds": seconds, "samples": samples,
                 "samples_per_second": samples / seconds if seconds else 0.0, **keys, "clients_ok": ok,
                 "train_loss": sum(losses) / len(losses) if losses else None}
        self.rounds.append(entry)
        log.info("round %d/%d (%s): %d/%d %s ok, %d samples in %.1f s = %.0f samples/s, loss %s", round_, rounds,
                 self.config.mode, ok, of, unit, samples, seconds, entry["samples_per_second"],
                 f"{entry['train_loss']:.4f}" if losses else "-")
        return entry


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
        # stopped by their hijacking detector (`--detect`): each entry's `detected_at_step` says when
        "detected": [e["client_id"] for e in entries if e["status"] == "detected"],
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
