"""`python flood_streams.py ...`: a flooding peer, run inside a host of tests/netns.py (`ip netns exec`).

Test-only. Opens STREAMS idle `Train` streams over CONNECTIONS connections to the server (each
channel with its own subchannel pool and a channel option of its own, so that gRPC gives each its
own TCP connection, as separate processes would have), sends nothing on any of them, waits until
the server's refusals have settled, and prints one JSON line: how many calls the server ended, with
which status codes and one message of each. It then holds the streams it got until its stdin
closes, and prints a second JSON line: how many of them were still open (the server did not end
the streams it let through) and how many connections it used.

`--health`: instead, one health check of the server (prints its status name) and exit.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitnet import security
from splitnet.v1 import split_pb2_grpc


def channel(args: argparse.Namespace, number: int) -> grpc.Channel:
    options = [("grpc.use_local_subchannel_pool", 1), ("mhfl.connection", number)]
    return security.open_channel(args.server, options, tls_ca=args.tls_ca, auth_token=args.auth_token)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--tls-ca", default="")
    p.add_argument("--auth-token", default="")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--share", type=int, default=16, help="the refusals have settled once all but this many ended")
    p.add_argument("--settle", type=float, default=30.0)
    p.add_argument("--health", action="store_true")
    args = p.parse_args()

    if args.health:
        with channel(args, -1) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), flush=True)
        return 0

    channels = [channel(args, number) for number in range(args.connections)]
    for ch in channels:  # connected before the flood, so that every stream has its connection
        grpc.channel_ready_future(ch).result(timeout=30)
    stubs = [split_pb2_grpc.SplitLearningStub(ch) for ch in channels]
    gates = [queue.Queue() for _ in range(args.streams)]
    calls = [stubs[i % len(stubs)].Train(iter(gate.get, None)) for i, gate in enumerate(gates)]
    deadline = time.monotonic() + args.settle
    while sum(call.done() for call in calls) < len(calls) - args.share and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a refusal more than there should be would show up now
    ended = [call for call in calls if call.done()]
    codes: dict[str, int] = {}
    details: dict[str, str] = {}
    for call in ended:
        codes[call.code().name] = codes.get(call.code().name, 0) + 1
        details.setdefault(call.code().name, call.details())
    print(json.dumps({"streams": len(calls), "ended": len(ended), "codes": codes, "details": details}), flush=True)

    sys.stdin.read()  # hold the flood until the test is done
    still_open = sum(not call.done() for call in calls)
    print(json.dumps({"still_open": still_open, "connections": len(channels)}), flush=True)
    for gate in gates:
        gate.put(None)
    for ch in channels:
        ch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
