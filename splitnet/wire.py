"""gRPC settings both ends must agree on: message limits and the service name.

gRPC refuses messages over 4 MiB by default and a batch of features easily exceeds it,
so both ends raise the limit explicitly. The application limit (`max_message_mb`) is
checked by our own code so an over-size message gets an error that names the flag that
raises it; gRPC's own hard limit sits above it as a backstop.
"""

from __future__ import annotations

from splitnet.schedule import LrSchedule
from splitnet.v1 import split_pb2

SERVICE_NAME = split_pb2.DESCRIPTOR.services_by_name["SplitLearning"].full_name
DEFAULT_MAX_MESSAGE_MB = 64
_GRPC_CEILING = 2**31 - 1


def message_limit_bytes(max_message_mb: float) -> int:
    if max_message_mb <= 0:
        raise ValueError("max_message_mb must be > 0")
    return min(int(max_message_mb * 2**20), _GRPC_CEILING)


def grpc_options(max_message_mb: float) -> list[tuple[str, int]]:
    """Channel / server options: gRPC's hard limit at 4x ours so ours speaks first."""
    hard = min(4 * message_limit_bytes(max_message_mb), _GRPC_CEILING)
    return [("grpc.max_send_message_length", hard), ("grpc.max_receive_message_length", hard)]


def too_large(kind: str, size: int, max_message_mb: float, flag: str) -> str | None:
    """An error text naming the limit and the flag that raises it, or None if `size` fits."""
    limit = message_limit_bytes(max_message_mb)
    if size <= limit:
        return None
    return (f"{kind} message of {size} bytes exceeds the limit of {limit} bytes "
            f"({max_message_mb:g} MiB); raise it with {flag}")


def parse_address(address: str, listen: bool = False) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port), with an error that says what to pass.

    A listening address may use port 0 (any free port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)


def schedule_message(schedule: LrSchedule) -> split_pb2.LrSchedule:
    return split_pb2.LrSchedule(kind=schedule.kind, milestones=schedule.milestones, gamma=schedule.gamma,
                                warmup_epochs=schedule.warmup_epochs, epochs=schedule.epochs,
                                steps_per_epoch=schedule.steps_per_epoch)


def schedule_from_message(msg: split_pb2.LrSchedule) -> LrSchedule:
    """An absent schedule (an edge older than schedules) is a constant rate; ValueErrors name the field."""
    if not msg.kind:
        return LrSchedule()
    if len(msg.milestones) > 64:
        raise ValueError("lr_schedule.milestones: at most 64")
    return LrSchedule(msg.kind, tuple(msg.milestones), msg.gamma, msg.warmup_epochs, msg.epochs, msg.steps_per_epoch)
