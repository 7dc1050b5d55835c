"""Long-lived Train / Infer streams: how many may be open, and how long one may sit idle.

Each open stream holds one of the gRPC server's `--max-workers` threads for as long as it
lasts. Without limits, a peer that opens streams and sends nothing would hold every
worker: health checks, reflection, Stats and OpenSession would then be refused. So:

- `StreamSlots` caps the open streams below the worker count, overall (`--max-streams`)
  and per peer (`--max-streams-per-peer`, see `peer_key`), and refuses an extra stream at
  once with RESOURCE_EXHAUSTED instead of letting it take the workers the other calls need;
- `IdleWatch` ends a stream on which no message arrived for `--idle-timeout` seconds,
  with UNAVAILABLE and a message that says so (the edge reconnects and replays, as after
  any dropped stream).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from typing import Iterator, TypeVar

import grpc

T = TypeVar("T")


def peer_key(peer: str, principal: str) -> str:
    """Who a stream counts against for `--max-streams-per-peer`: the remote host, without the port,
    together with the caller's principal (token fingerprint / certificate name; '' without auth).

    Not the connection (`context.peer()` itself, with its port): a peer could then open as many
    connections as it liked and take every slot. Not the host alone: behind a NAT or a proxy,
    honest clients share one address, and with tokens each of them can still be told apart by
    its credential. Not the session's client id: a stream names its session only in its first
    message, and an idle flood sends none. So one credential on one host is one peer; clients
    that share both (a NAT without tokens) share one peer's streams, and the flag sizes it.

    gRPC writes the peer as a URI: an IPv6 host comes percent-encoded (`ipv6:%5B::1%5D:PORT`), decoded
    here; read as it came, every IPv6 host had the same key (''), so that one IPv6 host's flood took
    the share of all the others (the edge's address, or only its token, had told them apart).
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":  # ipv6:%5B::1%5D:PORT, i.e. ipv6:[::1]:PORT
        host = urllib.parse.unquote(rest).rpartition("]")[0].lstrip("[")
    else:  # e.g. a unix socket: no port to strip
        host = peer
    return f"{host} {principal}" if principal else host


class StreamsExhausted(Exception):
    """No stream slot is free; the message names the limit and its flag."""


class StreamSlots:
    def __init__(self, total: int, per_peer: int) -> None:
        self.total, self.per_peer = total, per_peer
        self._lock = threading.Lock()
        self._open = 0
        self._by_peer: dict[str, int] = {}

    @property
    def in_use(self) -> int:
        return self._open

    def take(self, peer: str) -> None:
        """Take a slot for a stream of `peer` (its `peer_key`, the same over all its connections)."""
        with self._lock:
            if self._open >= self.total:
                raise StreamsExhausted(f"the server already serves {self._open} Train / Infer streams; workers stay "
                                       "free for health checks and sessions (cloud-server --max-streams)")
            if self._by_peer.get(peer, 0) >= self.per_peer:
                raise StreamsExhausted(f"this peer (its address and credential, over all its connections) already "
                                       f"holds {self.per_peer} open Train / Infer streams, its share of the server's "
                                       f"{self.total} (cloud-server --max-streams-per-peer)")
            self._open += 1
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1

    def give_back(self, peer: str) -> None:
        with self._lock:
            self._open -= 1
            self._by_peer[peer] -= 1
            if not self._by_peer[peer]:
                del self._by_peer[peer]


class IdleWatch:
    """Ends a stream whose handler has waited `idle_s` for its next message, with UNAVAILABLE and a
    message that says so (the edge reconnects and replays, as after any dropped stream).

    The handler reads its own requests. gRPC's request iterator blocks without a timeout, and a
    helper thread per stream that read it and handed each message over cost a thread per open
    stream and a hand-off per message (0.05-0.2 ms of every round trip; README, "The floor under
    the split"). Instead each stream only notes when its handler started to wait (and clears
    it when a message came), and one thread for all the server's streams ends those that waited
    too long.
    That thread needs no waking per message: a stream that starts to wait after the thread went
    to sleep cannot be due before `idle_s` from then, so it sleeps until the earliest wait due
    among those it saw, or for `idle_s`. It runs only while some stream is open: the last stream
    to end wakes it, and it ends.

    A stream is ended by cancelling its call with the status, through the call object grpcio's
    server context holds: the context's public `cancel()` takes no status, and the peer would read
    a bare CANCELLED (`_Waiting.end` falls back to it where that object is missing; the tests of
    the idle status would then fail). The handler's read fails, and the stream ends without a
    reply.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._lock = threading.Condition()
        self._streams: set[_Waiting] = set()
        self._running = False

    def watch(self, requests: Iterator[T], context: grpc.ServicerContext) -> Iterator[T]:
        """The requests of a stream, read in the handler's thread, ended once none comes for `idle_s`."""
        waiting = _Waiting(context)
        with self._lock:
            self._streams.add(waiting)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True, name="idle-streams").start()
        it = iter(requests)
        try:
            while True:
                waiting.since = time.monotonic()
                try:
                    request = next(it)
                except StopIteration:
                    return
                except grpc.RpcError:
                    if waiting.ended:  # our own cancellation: the peer has its status already
                        return
                    raise
                waiting.since = None
                yield request
        finally:
            waiting.since = None  # a stream that ended is not waiting (the thread may hold it a moment longer)
            with self._lock:
                self._streams.discard(waiting)
                if not self._streams:
                    self._lock.notify()

    def _run(self) -> None:
        wake = time.monotonic()
        while True:
            with self._lock:
                if self._streams:
                    self._lock.wait(max(0.0, wake - time.monotonic()))
                if not self._streams:
                    self._running = False
                    return
                streams = list(self._streams)
            now = time.monotonic()
            wake = now + self.idle_s
            for waiting in streams:
                since = waiting.since
                if since is None:
                    continue
                if now - since >= self.idle_s:
                    waiting.end(f"no message for {self.idle_s:g} s: the server ended this idle stream "
                                "(cloud-server --idle-timeout); open a new one to continue")
                else:
                    wake = min(wake, since + self.idle_s)


class _Waiting:
    """One stream under `IdleWatch`: since when its handler waits for a message (None: it has one)."""

    __slots__ = ("context", "since", "ended")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.since: float | None = None
        self.ended = False

    def end(self, message: str) -> None:
        self.ended, self.since = True, None
        call = getattr(getattr(self.context, "_rpc_event", None), "call", None)
        try:
            call.cancel(grpc.StatusCode.UNAVAILABLE.value[0], message)  # type: ignore[union-attr]
        except (AttributeError, TypeError):  # another grpcio: the bare cancel
            self.context.cancel()
