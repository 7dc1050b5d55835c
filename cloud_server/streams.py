"""Long-lived Train / Infer streams: how many may be open, and how long one may sit idle.

Each open stream holds one of the gRPC server's `--max-workers` threads for as long as it
lasts. Without limits, a peer that opens streams and sends nothing would hold every
worker: health checks, reflection, Stats and OpenSession would then be refused. So:

- `StreamSlots` caps the open streams below the worker count, overall (`--max-streams`)
  and per peer (`--max-streams-per-peer`, see `peer_key`), and refuses an extra stream at
  once with RESOURCE_EXHAUSTED instead of letting it take the workers the other calls need;
- `within_idle` ends a stream on which no message arrived for `--idle-timeout` seconds,
  with UNAVAILABLE and a message that says so (the edge reconnects and replays, as after
  any dropped stream).
"""

from __future__ import annotations

import queue
import threading
import urllib.parse
from typing import Iterator, TypeVar

import grpc

T = TypeVar("T")
_END = object()


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


def within_idle(requests: Iterator[T], context: grpc.ServicerContext, idle_s: float) -> Iterator[T]:
    """The requests of a stream; the call is ended with UNAVAILABLE once none arrives for `idle_s`.

    gRPC's request iterator blocks without a timeout, so a helper thread reads it and hands
    each message over. It reads one message ahead at most (the client's flow control still
    applies) and ends with the call. The end of the stream, or an error raised while
    reading (an abort by `ParseRequests`, a cancelled call), is always handed over, so the
    handler never waits out `idle_s` for a call that is already over; an error is raised
    here, in the handler's thread.
    """
    inbox: queue.Queue = queue.Queue()  # at most one request and the end
    room = threading.Semaphore(1)  # released each time the handler takes a request

    def read() -> None:
        it = iter(requests)
        try:
            while True:
                while not room.acquire(timeout=1.0):
                    if not context.is_active():  # the handler is gone: nobody reads on
                        return
                inbox.put(next(it))
        except StopIteration:
            inbox.put(_END)
        except BaseException as err:  # noqa: BLE001 - re-raised in the handler's thread
            inbox.put(err)

    threading.Thread(target=read, daemon=True, name="stream-reader").start()
    while True:
        try:
            item = inbox.get(timeout=idle_s)
        except queue.Empty:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"no message for {idle_s:g} s: the server ended this idle stream "
                          "(cloud-server --idle-timeout); open a new one to continue")
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        room.release()
        yield item
