"""gRPC settings both ends must agree on: message limits, the service name, the replies kept.

gRPC refuses messages over 4 MiB by default and a batch of features easily exceeds it,
so both ends raise the limit explicitly. The application limit (`max_message_mb`) is
checked by our own code so an over-size message gets an error that names the flag that
raises it; gRPC's own hard limit sits above it as a backstop.
"""

from __future__ import annotations

import errno
import socket

from splitnet.v1 import split_pb2

SERVICE_NAME = split_pb2.DESCRIPTOR.services_by_name["SplitLearning"].full_name
DEFAULT_MAX_MESSAGE_MB = 64
_GRPC_CEILING = 2**31 - 1
MAX_PORT = 65535
# Replies the server keeps per client for re-sent steps: one edge acknowledges all but the steps it
# has in flight (--pipeline K keeps K + 1 in flight) or, writing its own state, all but those after
# its last state (so edge-client --state-every is at most this); an edge that acknowledges nothing
# (older ones) keeps this many gradients, of one batch each, in the server's memory and checkpoint.
MAX_KEPT_REPLIES = 16


def message_limit_bytes(max_message_mb: float) -> int:
    if max_message_mb <= 0:
        raise ValueError("max_message_mb must be > 0")
    return min(int(max_message_mb * 2**20), _GRPC_CEILING)


def grpc_options(max_message_mb: float) -> list[tuple[str, int]]:
    """Channel / server options: gRPC's hard limit at 4x ours so ours speaks first."""
    hard = min(4 * message_limit_bytes(max_message_mb), _GRPC_CEILING)
    return [("grpc.max_send_message_length", hard), ("grpc.max_receive_message_length", hard)]


def server_options(max_message_mb: float) -> list[tuple[str, int]]:
    """`grpc_options` plus what only a listening server needs.

    `grpc.so_reuseport` = 0: gRPC sets SO_REUSEPORT on Linux by default, so a second
    server (or a proxy) started on a port already in use would bind it too and the kernel
    would split the connections between them: clients would reach whichever it picked.
    Off, the second bind fails and the CLI says the port is in use.

    Keepalive: the server pings a connection after 60 s without traffic and closes it if
    no answer comes within 20 s, so the streams of a peer that vanished (power loss, a
    dropped network, no FIN ever sent) are freed instead of holding their workers.
    """
    return [*grpc_options(max_message_mb), ("grpc.so_reuseport", 0), ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000)]


def too_large(kind: str, size: int, max_message_mb: float, flag: str) -> str | None:
    """An error text naming the limit and the flag that raises it, or None if `size` fits."""
    limit = message_limit_bytes(max_message_mb)
    if size <= limit:
        return None
    return (f"{kind} message of {size} bytes exceeds the limit of {limit} bytes "
            f"({max_message_mb:g} MiB); raise it with {flag}")


def listening_socket(host: str, port: int, flag: str) -> socket.socket:
    """A TCP socket listening on host:port, without SO_REUSEPORT (so a port in use fails
    here), or an OSError naming the address and `flag`. An IPv6 host ('::1', 'fd00::5', '::') gets an
    IPv6 socket (the default, IPv4, refused every one of them: "Address family ... not supported")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as err:
        reason = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
        raise OSError(f"cannot listen on {host}:{port}: {reason} (pass another {flag})") from None


def add_port(server, host: str, port: int, flag: str, credentials=None) -> int:
    """Bind a gRPC server built with `server_options` to host:port; return the port it got.

    The address is tried with `listening_socket` first, so that a port in use is one line
    naming it and `flag` instead of gRPC's own log line and RuntimeError.
    """
    listening_socket(host, port, flag).close()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind": taken between the probe and here
        raise OSError(f"cannot listen on {host}:{port}: the port is in use (pass another {flag})") from None


def parse_address(address: str, listen: bool = False) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port), with an error that says what to pass.

    A listening address may use port 0 (any free port)."""
    host, sep, port = address.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= MAX_PORT:
        raise ValueError(f"address {address!r} is not HOST:PORT with a port in {lowest}..{MAX_PORT} "
                         "(e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)

