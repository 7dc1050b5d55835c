"""Settings of a many-client Ray run, and the environment Ray needs; imports no Ray.

Kept apart from the engines (`deploy.sim.actors`, `deploy.sim.virtual`) because some of
Ray's settings are environment variables it reads once, when it is imported: the command
line, the tests and a parallel sweep (`deploy.experiments.runner`) have to know them (and
parse their flags) before Ray is imported.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

from edge_client.config import EdgeConfig

MODES = ("sequential", "parallel", "splitfed")
# Passed on to every actor. Not SPLIT_AUTH_TOKEN: the edge CLI resolves it into
# ConnectionConfig.auth_token, which reaches the actors inside their config.
FORWARDED_ENV = ("SPLIT_LOG_LEVEL",)


@dataclass(frozen=True)
class PartitionSpec:
    """How the training set is shared out among the clients (`deploy.sim.partition` does it)."""

    kind: str = "iid"
    alpha: float = 0.0  # dirichlet concentration; unused for iid

    def __str__(self) -> str:
        return self.kind if self.kind == "iid" else f"{self.kind}:{self.alpha:g}"

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        """'iid' or 'dirichlet:ALPHA' (ALPHA > 0), with an error that says what to pass."""
        kind, _, arg = text.partition(":")
        if kind == "iid" and not arg:
            return cls()
        if kind == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                alpha = -1.0
            if alpha > 0 and math.isfinite(alpha):
                return cls("dirichlet", alpha)
            raise ValueError(f"partition {text!r}: dirichlet needs a concentration > 0, e.g. dirichlet:0.5")
        raise ValueError(f"unknown partition {text!r}; use iid or dirichlet:ALPHA")


@dataclass(frozen=True)
class Kill:
    """Fault injection: `ray.kill` client `client` (0-based) in the middle of round `round` (1-based)."""

    client: int
    round: int

    @classmethod
    def parse(cls, text: str) -> "Kill":
        client, _, round_ = text.partition("@")
        try:
            return cls(int(client), int(round_))
        except ValueError:
            raise ValueError(f"kill {text!r}: expected CLIENT@ROUND, e.g. 1@2") from None


@dataclass(frozen=True)
class VirtualClients:
    """Clients as states run in turns by a pool of worker actors (`split-ray --workers`,
    `deploy.sim.virtual`), instead of one actor each. Error messages name the flags."""

    workers: int = 0  # worker actors; 0: as many as the Ray cluster's CPUs allow
    fraction: float = 1.0  # of the clients, sampled afresh (seeded) every round
    min_clients: int = 1  # at least this many take part in a round
    local_steps: int = 0  # steps a turn; 0: one local epoch (a pass over the client's shard)
    spill_dir: str = ""  # the clients' states as files in this folder; "": in Ray's object store

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0: as many as Ray's CPUs allow), got {self.workers}")
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"--fraction must lie in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"--min-clients must be >= 1, got {self.min_clients}")
        if self.local_steps < 0:
            raise ValueError(f"--local-steps must be >= 0 (0: one local epoch a turn), got {self.local_steps}")

    def per_round(self, clients: int) -> int:
        """How many of `clients` take part in a round: the fraction (rounded down), at least min_clients."""
        return min(clients, max(self.min_clients, math.floor(self.fraction * clients + 1e-9)))

    def participants(self, clients: int, rounds: int, seed: int) -> list[list[int]]:
        """Each round's clients, in the order their turns start: seeded draws without replacement,
        as federated averaging samples its clients (McMahan et al., 2017). Drawn before the run, so
        each client's schedule can span exactly the turns it will get."""
        rng = random.Random(seed)
        return [rng.sample(range(clients), self.per_round(clients)) for _ in range(rounds)]


@dataclass(frozen=True)
class RayRunConfig:
    edge: EdgeConfig  # every client's settings; the client id and seed are set per client
    clients: int = 2
    mode: str = "parallel"
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    threads: int = 1  # torch threads per actor: clients share cores with each other and the server
    cpus_per_client: float = 0.0  # Ray CPUs reserved per actor; 0: the cluster's CPUs shared out, at most 1 each
    kill: Kill | None = None
    virtual: VirtualClients | None = None  # None: one actor per client

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError("clients must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if self.cpus_per_client < 0:
            raise ValueError("cpus_per_client must be >= 0")
        if self.kill and not (0 <= self.kill.client < self.clients and 1 <= self.kill.round <= self.edge.epochs):
            raise ValueError(f"kill {self.kill.client}@{self.kill.round}: no such client or round "
                             f"({self.clients} clients, {self.edge.epochs} rounds)")
        if self.virtual:
            self._check_virtual(self.virtual)

    def _check_virtual(self, virtual: VirtualClients) -> None:
        if virtual.min_clients > self.clients:
            raise ValueError(f"--min-clients {virtual.min_clients} is more than the {self.clients} --clients")
        if self.edge.defense.cem != "none":
            raise ValueError("--cem with --workers: a virtual client does not carry a CEM surrogate's state from "
                             "turn to turn; run CEM clients one actor each (without --workers)")
        if self.kill:
            taking_part = self.participants()[self.kill.round - 1]
            if self.kill.client not in taking_part:
                raise ValueError(f"kill {self.kill.client}@{self.kill.round}: client {self.kill.client} takes no "
                                 f"part in round {self.kill.round} (its clients: {sorted(taking_part)[:10]}...)")

    def participants(self) -> list[list[int]]:
        """Each round's virtual clients (see VirtualClients.participants); --epochs is the rounds."""
        assert self.virtual is not None
        return self.virtual.participants(self.clients, self.edge.epochs, self.edge.seed)


def ray_environment(local: bool) -> dict[str, str]:
    """Environment for the driver (set before Ray is imported) and for every Ray worker.

    No usage statistics leave the machine. For a cluster started here (`local`), Ray's
    multi-node support is switched off, which makes it advertise and listen on 127.0.0.1
    instead of the machine's external interface: a one-machine run is not reachable from
    the network. A user's own setting of either variable wins.
    """
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if local:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    return {**env, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


def runtime_env(env: dict[str, str], address: str = "") -> dict | None:
    """`ray.init`'s runtime_env for `env` (this process's environment, set before Ray is imported).

    Only a cluster started elsewhere (`address`) needs the variables sent along: one that
    `ray.init` starts here runs its workers as children of processes that inherited them. Sent
    anyway, they make Ray start every worker through its runtime-env setup process: measured here,
    4 actors and their cluster took 32 busy core-seconds with it and 23 without, the actors ready
    after 10.4 s against 6.9 s."""
    return {"env_vars": env} if address else None
