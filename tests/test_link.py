"""The link emulator (`split-link`) delivers what it is set to, measured on real loopback sockets.

Each relay is a real `split-link` process; the far ends are plain sockets in this process.
Throughput is measured over two seconds of transfer at a few Mbit/s, from the first byte
the receiver sees to the last, so a late wake-up of any one thread costs little; delay as
the median round trip of small pings through the relay minus the median round trip of the
same pings straight to the same echo server. The tolerances are the issue's: 10% of the
bandwidth, 5 ms of the round trip the delay adds (twice the one-way delay). Both must hold
while other jobs keep the cores busy, which the ideal-clock design of the relay is for.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import threading
import time

import pytest

from deploy.link import main
from deploy.link_profiles import PROFILES, LinkProfile
from deploy.processes import start_process


def _listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def _serve(server: socket.socket, handle) -> None:
    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def _relay(upstream: socket.socket, *flags: str):
    port = upstream.getsockname()[1]
    return start_process(["deploy.link", "--upstream", f"127.0.0.1:{port}", *flags], r"listening on (\S+) ->",
                         timeout=30)


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


UP_MBPS, DOWN_MBPS, SECONDS = 4.0, 8.0, 2.0


def test_delivered_throughput_is_within_10_percent_of_each_directions_bandwidth():
    """Uplink and downlink at once, on two connections: each direction has its own rate."""
    up_bytes, down_bytes = int(UP_MBPS * 1e6 / 8 * SECONDS), int(DOWN_MBPS * 1e6 / 8 * SECONDS)
    payload_up, payload_down = os.urandom(up_bytes), os.urandom(down_bytes)
    seen: dict[str, tuple[float, float, int, str]] = {}  # direction -> first, last arrival, first chunk, sha256

    def receive(conn: socket.socket, total: int, name: str) -> None:
        digest, got, first, first_size = hashlib.sha256(), 0, 0.0, 0
        while got < total:
            chunk = conn.recv(65536)
            if not chunk:
                break
            if not got:
                first, first_size = time.perf_counter(), len(chunk)
            digest.update(chunk)
            got += len(chunk)
        seen[name] = (first, time.perf_counter(), first_size, digest.hexdigest() if got == total else "short")

    def handle(conn: socket.socket) -> None:  # the "cloud": the first byte says which test this connection is
        kind = conn.recv(1)
        if kind == b"u":
            receive(conn, up_bytes, "up")
        else:
            conn.sendall(payload_down)
        conn.close()

    upstream = _listener()
    _serve(upstream, handle)
    relay = _relay(upstream, "--up-mbps", str(UP_MBPS), "--down-mbps", str(DOWN_MBPS), "--delay-ms", "0")
    try:
        up, down = _connect(relay.address), _connect(relay.address)
        down.sendall(b"d")
        downloading = threading.Thread(target=receive, args=(down, down_bytes, "down"))
        downloading.start()
        up.sendall(b"u" + payload_up)
        downloading.join(SECONDS * 5)
        deadline = time.monotonic() + SECONDS * 5
        while "up" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        up.close()
        down.close()
    finally:
        relay.stop()
        upstream.close()
    assert seen["up"][3] == hashlib.sha256(payload_up).hexdigest()  # every byte, in order
    assert seen["down"][3] == hashlib.sha256(payload_down).hexdigest()
    for name, total, mbps in (("up", up_bytes, UP_MBPS), ("down", down_bytes, DOWN_MBPS)):
        first, last, first_size, _ = seen[name]
        delivered = (total - first_size) * 8 / (last - first) / 1e6
        assert abs(delivered - mbps) <= 0.1 * mbps, f"{name}: {delivered:.3f} Mbit/s delivered, {mbps} set"


def _echo(conn: socket.socket) -> None:
    try:
        while chunk := conn.recv(4096):
            conn.sendall(chunk)
    except OSError:
        pass
    conn.close()


def _rtts_ms(address: str, pings: int = 25, size: int = 64) -> list[float]:
    conn = _connect(address)
    message, times = os.urandom(size), []
    for _ in range(pings):
        start = time.perf_counter()
        conn.sendall(message)
        got = b""
        while len(got) < size:
            got += conn.recv(size - len(got))
        times.append((time.perf_counter() - start) * 1e3)
        assert got == message
    conn.close()
    return times


@pytest.fixture()
def echo_server():
    server = _listener()
    _serve(server, _echo)
    yield server
    server.close()


def test_added_round_trip_is_within_5_ms_of_twice_the_one_way_delay(echo_server):
    delay_ms = 20.0
    direct = statistics.median(_rtts_ms(f"127.0.0.1:{echo_server.getsockname()[1]}"))
    relay = _relay(echo_server, "--profile", "wifi", "--delay-ms", str(delay_ms), "--jitter-ms", "0")
    try:
        through = statistics.median(_rtts_ms(relay.address))
    finally:
        relay.stop()
    added = through - direct
    assert abs(added - 2 * delay_ms) <= 5.0, f"round trip {through:.2f} ms through the link, {direct:.2f} ms direct"


def test_jitter_spreads_the_delay_and_keeps_the_bytes_in_order(echo_server):
    relay = _relay(echo_server, "--up-mbps", "0", "--down-mbps", "0", "--delay-ms", "20", "--jitter-ms", "5")
    try:
        # One packet each way: a round trip is 40 ms plus two uniform draws in [-5, 5] (sd 4.1 ms).
        # A message of many packets would arrive with its latest one, the largest of their draws,
        # whose spread is a fifth of that.
        rtts = _rtts_ms(relay.address, pings=30)
        _rtts_ms(relay.address, pings=3, size=20000)  # 14 packets each way, each its own draw: compared in order
    finally:
        relay.stop()
    assert statistics.stdev(rtts) > 2.0, rtts
    assert 30.0 <= min(rtts) and statistics.median(rtts) <= 60.0


def test_profiles_and_bad_numbers_name_their_flag(capsys):
    assert {"constrained", "wifi", "datacenter"} <= set(PROFILES)
    constrained = PROFILES["constrained"]
    assert constrained.up_mbps < constrained.down_mbps and constrained.delay_ms >= 10  # a constrained uplink
    assert main(["--list-profiles"]) == 0
    assert "constrained: up 2 Mbit/s, down 10 Mbit/s, delay 40 ms" in capsys.readouterr().out
    for argv, needle in ((["--upstream", "127.0.0.1:1", "--up-mbps", "-1"], "--up-mbps must be a finite number >= 0"),
                         (["--upstream", "127.0.0.1:1", "--delay-ms", "nan"], "--delay-ms must be a finite number"),
                         (["--upstream", "nowhere"], "--upstream: address 'nowhere' is not HOST:PORT"),
                         ([], "--upstream HOST:PORT is required"),
                         (["--upstream", "127.0.0.1:1", "--profile", "5g"], "invalid choice: '5g'")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(ValueError, match="jitter_ms"):
        LinkProfile("x", 1, 1, 1, -0.5)
