"""The named links: what a user picks by name (`split-link --profile`, a sweep's `links` axis,
`split-plan --link`), and the numbers of a link (`LinkProfile`) that `deploy.link` emulates.

Kept apart from the emulator and its command (`deploy/link.py`) so that the sweep's
configuration and the planner read the names without importing a command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkProfile:
    """One link's numbers. Bandwidth in Mbit/s (10^6 bit/s) of payload; 0 means unlimited."""

    name: str
    up_mbps: float  # edge -> cloud
    down_mbps: float  # cloud -> edge
    delay_ms: float  # one way, each direction: the round trip adds twice this
    jitter_ms: float = 0.0  # each packet's delay varies uniformly by up to this, either way
    about: str = ""

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps", "delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidLink(name, value)

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms

    def describe(self) -> str:
        def rate(mbps: float) -> str:
            return "unlimited" if mbps == 0 else f"{mbps:g} Mbit/s"

        return (f"{self.name}: up {rate(self.up_mbps)}, down {rate(self.down_mbps)}, delay {self.delay_ms:g} ms"
                + (f" +- {self.jitter_ms:g} ms" if self.jitter_ms else "") + f" (round trip {self.rtt_ms:g} ms)")

    def as_dict(self) -> dict:
        return {"name": self.name, "up_mbps": self.up_mbps, "down_mbps": self.down_mbps, "delay_ms": self.delay_ms,
                "jitter_ms": self.jitter_ms}


class InvalidLink(ValueError):
    """A LinkProfile number out of range; `field` lets the command line name its flag."""

    def __init__(self, field: str, value) -> None:
        super().__init__(f"LinkProfile.{field} must be a finite number >= 0, got {value!r}")
        self.field, self.value = field, value


# Named profiles: what a user picks by name (`--profile`, a sweep's `links` axis, `split-plan --link`).
PROFILES = {p.name: p for p in (
    LinkProfile("constrained", 2, 10, 40, 5,
                "a constrained uplink: a camera or phone on a loaded cell, or IoT on a weak signal"),
    LinkProfile("lte", 10, 40, 25, 5, "a typical 4G/LTE connection"),
    LinkProfile("wifi", 200, 400, 2, 0.5, "a fast Wi-Fi (802.11ax) next to the access point, to a nearby cloud"),
    LinkProfile("datacenter", 1000, 1000, 0.25, 0, "two hosts in one data centre (1 Gbit/s, 0.5 ms round trip)"),
)}
DIRECT = "none"  # not a profile: no emulator, the edge connects straight to the cloud
