"""Settings of a many-client Ray run, and the environment Ray needs; imports no Ray.

Kept apart from `deploy.ray_clients` because some of Ray's settings are environment
variables it reads once, when it is imported: the command line and the tests have to
know them (and parse their flags) before Ray is imported.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from edge_client.config import EdgeConfig

MODES = ("sequential", "parallel", "splitfed")
# Passed on to every actor. Not SPLIT_AUTH_TOKEN: the edge CLI resolves it into
# ConnectionConfig.auth_token, which reaches the actors inside their config.
FORWARDED_ENV = ("SPLIT_LOG_LEVEL",)


@dataclass(frozen=True)
class PartitionSpec:
    """How the training set is shared out among the clients (`deploy.partition` does it)."""

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
class RayRunConfig:
    edge: EdgeConfig  # every client's settings; the client id and seed are set per client
    clients: int = 2
    mode: str = "parallel"
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    threads: int = 1  # torch threads per actor: clients share cores with each other and the server
    cpus_per_client: float = 0.0  # Ray CPUs reserved per actor; 0: the cluster's CPUs shared out, at most 1 each
    kill: Kill | None = None

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
