"""`split-link` against the kernel's `tbf`: one transfer across two hosts, shaped by each at the same rate.

Two hosts on one machine (network namespaces on a bridge, tests/netns.py: needs root), `edge`
and `cloud`. The transfer: the edge sends `--megabytes` MB of random bytes over one TCP
connection to a sink on the cloud's address, which measures the rate at which its kernel
received them (the slope of the socket's byte count over time, between 10% and 95% of the
bytes: see `sink`). Per `--mbps` rate it runs twice, alternating, `--repeats` times:

- tbf: the kernel's token bucket on the edge's eth0, the edge sending straight to the sink:
  `tc qdisc replace dev eth0 root tbf rate RATEbit burst BYTES limit 262144` (the bucket
  200 ms of the rate, `--tbf-burst-ms`: see `compare`; the queue split-link's smallest);
- split-link: no qdisc; a `split-link` process on the edge, the edge sending through it:
  `split-link --listen 127.0.0.1:0 --upstream CLOUD:PORT --up-mbps R --down-mbps 0 --delay-ms 0 --jitter-ms 0`.

Both shape what leaves the edge for the wire. Prints a line per rate and one JSON object: per
rate the median of each (`tbf_mbps`, `split_link_mbps`), `ratio` (tbf over split-link), every
run's rate, the tbf runs' retransmitted segments, and `tbf_payload_share`, the share of a full
frame that tbf counts which is payload (1448 of 1514 bytes: tbf counts the Ethernet, IP and TCP
headers, split-link's rate is payload): the ratio to expect where nothing else differs.

    sudo .venv/bin/python benchmarks/link_vs_tbf.py --mbps 2 4 8 --megabytes 3 --repeats 3

tests/test_multihost_link.py runs `compare` at one rate and holds the ratio to 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the hosts: tests/netns.py

from deploy.link import MIN_QUEUE_BYTES  # noqa: E402
from deploy.processes import ServerProcess, start_command  # noqa: E402
from netns import Host, NotPermitted, can_make_namespaces, network  # noqa: E402

SCRIPT = Path(__file__).resolve()
ADDRESSES = {"edge": "10.78.0.2", "cloud": "10.78.0.3"}
# A full frame on the veth: 1448 bytes of payload (MSS 1460 less 12 bytes of TCP timestamps), 32 of
# TCP header with timestamps, 20 of IP, 14 of Ethernet; tbf counts all 1514 of them
PAYLOAD, FRAME = 1448, 1514
# tbf's queue holds as much as split-link's smallest (deploy.link.MIN_QUEUE_BYTES); its bucket is
# BURST_MS of the rate (see compare)
TBF = "qdisc replace dev eth0 root tbf rate {bits}bit burst {burst} limit {limit}"
BURST_MS = 200
LINK = "split-link --listen 127.0.0.1:0 --upstream {upstream} --up-mbps {mbps} --down-mbps 0 --delay-ms 0 --jitter-ms 0"
SAMPLE_SECONDS = 0.005  # the sink samples its byte count this often
WINDOW = (0.1, 0.95)  # the rate is measured between these shares of the bytes: the start (a full bucket, slow
# start) and the tail out
TIMEOUT_MARGIN = 30  # seconds a transfer may take beyond its bytes at the set rate


def tcp_info(conn: socket.socket) -> tuple[int, int, int]:
    """The kernel's counters of a TCP socket (Linux's struct tcp_info): retransmitted segments, payload
    bytes acknowledged by the peer, payload bytes received in order."""
    raw = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    (retransmitted,), (acked, received) = struct.unpack_from("<I", raw, 100), struct.unpack_from("<QQ", raw, 120)
    return retransmitted, acked, received


def sink(address: str) -> None:
    """Accept one connection, read it to its end, and print as JSON its bytes and the rate at which the
    kernel received them: the least-squares slope of the socket's byte count over time, sampled every
    SAMPLE_SECONDS while the count is within WINDOW of the bytes, each sample the clock and the count
    read together. A late wake-up of this process only moves or drops a sample, and the receive buffer
    holds what a late reader has not read: neither bends the rate, as timing the reads would on a
    loaded machine."""
    host, port = address.rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    print(f"sink listening on {host}:{server.getsockname()[1]}", flush=True)
    conn, _ = server.accept()
    done, read = threading.Event(), [0]

    def drain() -> None:
        while chunk := conn.recv(1 << 20):
            read[0] += len(chunk)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    samples = []
    while not done.wait(SAMPLE_SECONDS):
        samples.append((time.perf_counter(), tcp_info(conn)[2]))
    total = read[0]
    inside = [(t, n) for t, n in samples if WINDOW[0] * total <= n <= WINDOW[1] * total]
    slope = statistics.linear_regression(*zip(*inside)).slope if len(inside) > 2 else 0.0
    print(json.dumps({"bytes": total, "samples": len(inside),
                      "seconds": inside[-1][0] - inside[0][0] if inside else 0.0, "mbps": slope * 8 / 1e6}),
          flush=True)


def source(address: str, size: int) -> None:
    """Send `size` random bytes, wait until the peer has acknowledged them all, and print the
    connection's retransmitted segments."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(os.urandom(size))
        while tcp_info(conn)[1] <= size:  # the count includes the SYN's sequence number
            time.sleep(SAMPLE_SECONDS)
        print(json.dumps({"retransmitted": tcp_info(conn)[0]}), flush=True)


def last_line(proc: ServerProcess) -> str:
    """The line `proc` printed last, once it has ended and its output has been read to the end."""
    proc.proc.wait(TIMEOUT_MARGIN)
    assert proc.proc.returncode == 0, f"{proc.proc.args} failed:\n{proc.output()}"
    deadline = time.monotonic() + 5
    while not proc.lines[-1].startswith("{") and time.monotonic() < deadline:  # its reader thread may lag
        time.sleep(0.05)
    return proc.lines[-1]


def transfer(edge: Host, cloud: Host, size: int, mbps: float, link: bool) -> dict:
    """`size` bytes from the edge to a sink on the cloud's address, through a split-link at `mbps` on the
    edge if `link`: the rate the sink measured (`mbps`) and the sender's `retransmitted` segments. A sink
    takes one connection, so each transfer starts one, then the relay in front of it (a relay connects
    upstream when the edge connects to it)."""
    sink_proc = start_command(cloud.command(f"{sys.executable} {SCRIPT} --sink {cloud.address}:0"),
                              r"sink listening on (\S+)", timeout=60, env=cloud.env())
    relay = None
    try:
        target = sink_proc.address
        if link:
            relay = start_command(edge.command(LINK.format(upstream=target, mbps=mbps)),
                                  r"split-link listening on (\S+) ->", timeout=60, env=edge.env())
            target = relay.address
        sent = subprocess.run(edge.command(f"{sys.executable} {SCRIPT} --source {target} --bytes {size}"),
                              env=edge.env(), capture_output=True, text=True, check=True,
                              timeout=size * 8 / (mbps * 1e6) + TIMEOUT_MARGIN)
        result = json.loads(last_line(sink_proc))
        assert result["bytes"] == size, f"the sink got {result['bytes']} of {size} bytes"
        assert result["samples"] > 2, f"the sink sampled its byte count too rarely: {result}"
        return {**result, **json.loads(sent.stdout)}
    finally:
        if relay:
            relay.stop(timeout=5)
        sink_proc.stop(timeout=5)


def through_tbf(edge: Host, cloud: Host, size: int, mbps: float, burst: int) -> dict:
    edge.tc(TBF.format(bits=int(mbps * 1e6), burst=burst, limit=MIN_QUEUE_BYTES))
    try:
        return transfer(edge, cloud, size, mbps, link=False)
    finally:
        edge.tc("qdisc del dev eth0 root")


def compare(edge: Host, cloud: Host, mbps: float, megabytes: float, repeats: int = 1,
            burst_ms: float = BURST_MS) -> dict:
    """The same transfer through tbf and through split-link at `mbps`, alternating `repeats` times;
    the median rate of each, their ratio, each run's rate and the retransmissions of the tbf runs.

    tbf's bucket holds `burst_ms` of the rate (at least a frame). A token bucket keeps no more tokens
    than its bucket holds, so when the kernel's send path (the softirqs that run the queue and let the
    sender's TCP queue more) runs later than the bucket lasts, that time is lost for good, as on a link
    left idle. On the loaded build machine a 16 KB bucket (16 ms at 8 Mbit/s) delivered 5.69 to 7.60 of
    the 7.65 Mbit/s of payload tbf carries at 8, at nice 0 as at nice 10; 200 ms lost nothing
    measurable. split-link's relay reads up to its queue ahead of the sender and delivers by an ideal
    clock, so its own lateness costs nothing over a transfer. The bucket's first burst is not measured
    (WINDOW)."""
    size = int(megabytes * 1e6)
    burst = max(FRAME, int(mbps * 1e6 / 8 * burst_ms / 1e3))
    if burst >= WINDOW[0] * size:
        raise ValueError(f"{megabytes:g} MB is too small a transfer to measure after tbf's {burst}-byte burst")
    tbf, link = [], []
    for _ in range(repeats):
        tbf.append(through_tbf(edge, cloud, size, mbps, burst))
        link.append(transfer(edge, cloud, size, mbps, link=True))
    tbf_mbps, link_mbps = statistics.median(r["mbps"] for r in tbf), statistics.median(r["mbps"] for r in link)
    return {"mbps_set": mbps, "megabytes": megabytes, "tbf_mbps": tbf_mbps, "split_link_mbps": link_mbps,
            "ratio": tbf_mbps / link_mbps, "tbf_payload_share": PAYLOAD / FRAME,
            "tbf_runs": [r["mbps"] for r in tbf], "split_link_runs": [r["mbps"] for r in link],
            "tbf_retransmitted": [r["retransmitted"] for r in tbf], "tbf_burst_bytes": burst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mbps", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="the rates to set, Mbit/s")
    p.add_argument("--megabytes", type=float, default=3.0, help="the transfer's size, MB (10^6 bytes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tbf-burst-ms", type=float, default=BURST_MS, help="tbf's bucket, ms of the rate")
    p.add_argument("--sink", help=argparse.SUPPRESS)  # the sink's and the source's own processes
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sink:
        sink(args.sink)
        return 0
    if args.source:
        source(args.source, args.bytes)
        return 0
    reason = can_make_namespaces()
    if reason:
        print(f"link_vs_tbf: {reason}", file=sys.stderr)
        return 2
    rows = []
    try:
        with tempfile.TemporaryDirectory() as homes, network(ADDRESSES, Path(homes), prefix="lvt") as hosts:
            for mbps in args.mbps:
                row = compare(hosts["edge"], hosts["cloud"], mbps, args.megabytes, args.repeats, args.tbf_burst_ms)
                print(f"{mbps:g} Mbit/s set: tbf {row['tbf_mbps']:.3f}, split-link {row['split_link_mbps']:.3f} "
                      f"Mbit/s delivered, ratio {row['ratio']:.3f} (payload share of a tbf frame "
                      f"{row['tbf_payload_share']:.3f})", file=sys.stderr, flush=True)
                rows.append(row)
    except NotPermitted as err:
        print(f"link_vs_tbf: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"megabytes": args.megabytes, "repeats": args.repeats, "rates": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
