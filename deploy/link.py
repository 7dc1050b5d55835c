"""`split-link`: a link emulator in user space, a TCP relay in front of `cloud-server`.

On loopback a byte costs nothing, so bytes on the wire say little about what a user on a
phone or a camera waits for. This relay makes them cost what a real link charges: each
direction has its own bandwidth, every packet waits a one-way delay (with optional
jitter), and the bytes arrive in order, as TCP delivers them. Kernel emulation (tc
netem) needs root, and the build machines' kernel has no netem; this needs neither
(docs/DEPLOY.md measures it against the kernel's token bucket, tbf).

    split-link --upstream 127.0.0.1:50051 --profile constrained     # prints its address
    edge-client --server 127.0.0.1:PORT ...                         # the edge now sits behind the link

The model, per direction (uplink: edge -> cloud, downlink: cloud -> edge). What the relay
reads is cut into packets (`packet_bytes`: an MTU, or the bytes of 1 ms of the link if
more, so that a fast link is not a hundred thousand wake-ups a second); a packet enters a
FIFO queue that transmits at the direction's rate, shared by every connection through
this relay (one device, one radio), and is delivered the one-way delay after its last
byte left the queue, plus a jitter drawn uniformly in [-jitter, +jitter] (netem's default
distribution), never before the packet ahead of it on its connection. The clock is the
ideal one: a relay thread that wakes late delivers what is due at once, so CPU contention
delays single packets but does not lower the throughput. Bandwidth is payload (goodput):
TCP/IP headers are not counted. The TCP handshake itself is not delayed (gRPC keeps one
connection open for the whole run). Each connection may hold `queue_bytes` in flight in
the relay (the bandwidth-delay product plus 100 ms of queue, at least 256 KiB); beyond
that the relay stops reading and the sender's TCP backs off, as with a bounded router
queue.

Accuracy, measured by tests/test_link.py on loopback: delivered throughput within 10% of
the set bandwidth, added round trip within 5 ms of twice the one-way delay.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import replace

from deploy.link_profiles import PROFILES, InvalidLink, LinkProfile
from splitnet import wire
from splitnet.cli_util import listen_address, new_parser, setup_logging

log = logging.getLogger("deploy.link")

MTU_PAYLOAD = 1448  # TCP payload of a 1500-byte Ethernet frame with timestamps
MIN_QUEUE_BYTES = 256 * 1024
UNLIMITED_QUEUE_BYTES = 4 * 2**20


class _Direction:
    """One direction of the link: a FIFO transmitter shared by every connection through the relay."""

    def __init__(self, mbps: float, delay_ms: float, jitter_ms: float, rng: random.Random) -> None:
        self.rate = mbps * 1e6 / 8 if mbps else math.inf  # bytes per second
        self.delay, self.jitter = delay_ms / 1e3, jitter_ms / 1e3
        self.packet_bytes = MTU_PAYLOAD if math.isinf(self.rate) else max(MTU_PAYLOAD, int(self.rate / 1e3))
        self.queue_bytes = (UNLIMITED_QUEUE_BYTES if math.isinf(self.rate)
                            else max(MIN_QUEUE_BYTES, int(self.rate * (self.delay + self.jitter + 0.1))))
        self._rng = rng
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the transmitter has sent every packet queued so far
        self.bytes = 0

    def due(self, size: int, now: float) -> float:
        """When a packet of `size` bytes that reached the queue at `now` arrives at the far end."""
        with self._lock:
            self._free_at = max(now, self._free_at) + size / self.rate
            self.bytes += size
            sent = self._free_at
            jitter = self._rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return sent + max(0.0, self.delay + jitter)


class _Pump:
    """One connection's bytes in one direction: a reader queues packets with their arrival times,
    a writer delivers each when it is due. Two threads: a late sender never blocks the reads."""

    def __init__(self, src: socket.socket, dst: socket.socket, direction: _Direction, connection: "_Connection") -> None:
        self.src, self.dst, self.direction, self.connection = src, dst, direction, connection
        self._packets: deque[tuple[float, bytes]] = deque()
        self._queued = 0
        self._eof = self._failed = False
        self._cond = threading.Condition()
        for target in (self._read, self._write):
            threading.Thread(target=target, daemon=True).start()

    def _read(self) -> None:
        step = self.direction.packet_bytes
        try:
            while True:
                with self._cond:
                    while self._queued >= self.direction.queue_bytes and not self._failed:
                        self._cond.wait()
                    if self._failed:
                        break
                chunk = self.src.recv(65536)
                if not chunk:
                    break
                now = time.monotonic()
                with self._cond:
                    last = self._packets[-1][0] if self._packets else 0.0
                    for i in range(0, len(chunk), step):
                        packet = chunk[i:i + step]
                        last = max(last, self.direction.due(len(packet), now))  # in order, as TCP delivers
                        self._packets.append((last, packet))
                    self._queued += len(chunk)
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._packets and not self._eof:
                        self._cond.wait()
                    if not self._packets:
                        break
                    wait = self._packets[0][0] - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)  # woken early by a new packet: look again either way
                        continue
                    now, batch = time.monotonic(), []
                    while self._packets and self._packets[0][0] <= now:
                        batch.append(self._packets.popleft()[1])
                    data = b"".join(batch)
                    self._queued -= len(data)
                    self._cond.notify_all()
                self.dst.sendall(data)
            self.dst.shutdown(socket.SHUT_WR)  # the sender finished: pass its FIN on after its last byte
        except OSError:  # the receiver went away: end both directions
            with self._cond:
                self._failed = True
                self._cond.notify_all()
            self.connection.abort()
        self.connection.finished()


class _Connection:
    """An accepted connection and its upstream one; closed once both directions have finished."""

    def __init__(self, link: "Link", client: socket.socket, server: socket.socket) -> None:
        self.link, self.sockets = link, (client, server)
        self._running = 2
        self._lock = threading.Lock()
        for s in self.sockets:  # no Nagle: the relay decides when bytes leave, not the kernel
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        client, server = self.sockets
        _Pump(client, server, self.link.up, self)
        _Pump(server, client, self.link.down, self)

    def abort(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finished(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running:
                return
        for s in self.sockets:
            s.close()
        self.link.forget(self)


class Link:
    """The relay: listens on `listen`, connects each accepted connection to `upstream` and runs
    both directions through the profile's link (see the module docstring)."""

    def __init__(self, link: LinkProfile, listen: str, upstream: str, seed: int = 0) -> None:
        host, port = wire.parse_address(listen, listen=True)
        self.upstream = wire.parse_address(upstream)
        rng = random.Random(seed)
        self.up = _Direction(link.up_mbps, link.delay_ms, link.jitter_ms, rng)
        self.down = _Direction(link.down_mbps, link.delay_ms, link.jitter_ms, rng)
        self.sock = wire.listening_socket(host, port, "--listen")
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()

    def start(self) -> "Link":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError as err:
                log.warning("cannot reach upstream %s:%d: %s", *self.upstream, err)
                client.close()
                continue
            connection = _Connection(self, client, server)
            with self._lock:
                self._connections.add(connection)
            connection.start()

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def stop(self) -> None:
        self.sock.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.abort()


def build_parser():
    p = new_parser("split-link", __doc__)
    p.add_argument("--listen", type=listen_address, default="127.0.0.1:0",
                   help="where the edge connects (port 0: a free one, printed)")
    p.add_argument("--upstream", default="", help="the cloud-server (or attacker proxy) HOST:PORT to relay to")
    p.add_argument("--profile", default="constrained", choices=sorted(PROFILES),
                   help="named link (--list-profiles shows their numbers); the flags below override its numbers")
    p.add_argument("--up-mbps", type=float, default=None, metavar="MBIT",
                   help="uplink (edge -> cloud) payload bandwidth, Mbit/s; 0: unlimited")
    p.add_argument("--down-mbps", type=float, default=None, metavar="MBIT",
                   help="downlink (cloud -> edge) payload bandwidth, Mbit/s; 0: unlimited")
    p.add_argument("--delay-ms", type=float, default=None, metavar="MS",
                   help="one-way delay, each direction (the round trip adds twice this)")
    p.add_argument("--jitter-ms", type=float, default=None, metavar="MS",
                   help="each packet's delay varies uniformly by up to this, either way (order is kept)")
    p.add_argument("--seed", type=int, default=0, help="seeds the jitter")
    p.add_argument("--list-profiles", action="store_true", help="print the named profiles and exit")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


_FLAGS = {"up_mbps": "--up-mbps", "down_mbps": "--down-mbps", "delay_ms": "--delay-ms", "jitter_ms": "--jitter-ms"}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_profiles:
        for link in PROFILES.values():
            print(f"{link.describe()}\n    {link.about}")
        return 0
    if not args.upstream:
        p.error("--upstream HOST:PORT is required (the cloud-server to relay to)")
    try:
        wire.parse_address(args.upstream)
    except ValueError as err:
        p.error(f"--upstream: {err}")
    overrides = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    try:
        link = replace(PROFILES[args.profile], **overrides)
    except InvalidLink as err:
        p.error(f"{_FLAGS[err.field]} must be a finite number >= 0, got {err.value!r}")
    setup_logging(args.verbose)
    try:
        relay = Link(link, args.listen, args.upstream, args.seed).start()
    except OSError as err:
        print(f"split-link: error: {err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"split-link listening on {relay.address} -> {args.upstream} ({link.describe()})", flush=True)
    while not stop.wait(0.5):
        pass
    relay.stop()
    log.info("relayed %d bytes up, %d bytes down", relay.up.bytes, relay.down.bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
