"""`python -m crashing_server ARGS`: the real cloud-server, with the same arguments, that kills
itself with SIGKILL right after its Nth checkpoint rename (N: $CRASH_AFTER_RENAME).

That is the worst moment for a crash: the step is durable, so the restarted server counts it
as applied, but its reply (and, with pipelining, the replies before it) never reached the edge.
Polling the file from outside lands later, after more steps, where nothing is at stake.
"""

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from cloud_server import cli
from deploy.processes import ServerProcess, start_server
from edge_client.config import EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run


def _crash_after(renames: int):
    rename, done = os.replace, 0

    def replace(src, dst):
        nonlocal done
        rename(src, dst)
        done += 1
        if done == renames:
            os.kill(os.getpid(), signal.SIGKILL)

    return replace


def train_through_a_crash(checkpoints: Path, port: int, edge: Callable[[str], EdgeConfig],
                          renames: int = 2, every: int = 5) -> tuple[dict, ServerProcess]:
    """Train `edge(address)` against this server, checkpointing every `every` steps into `checkpoints`,
    which kills itself after its `renames`-th checkpoint; start the real server on the same port
    and let the edge finish. Returns the edge's report and the restarted server (the caller stops
    it); AssertionError if the server did not die as planned or the edge did not finish."""
    args = ("--checkpoint-dir", str(checkpoints), "--checkpoint-every", str(every))
    server = start_server(*args, port=port, module="crashing_server",
                          env={"PYTHONPATH": str(Path(__file__).parent), "CRASH_AFTER_RENAME": str(renames)})
    config = edge(server.address)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run(config, RemoteCloud(config.connection))))
    worker.start()
    try:
        assert server.proc.wait(120) == -signal.SIGKILL
    finally:
        server = start_server(*args, port=port)  # also where the kill came late: the edge needs a server
    worker.join(300)
    if worker.is_alive() or not result:
        server.stop()
        raise AssertionError("the client did not finish after the restart")
    return result, server


if __name__ == "__main__":
    os.replace = _crash_after(int(os.environ["CRASH_AFTER_RENAME"]))
    sys.exit(cli.main())
