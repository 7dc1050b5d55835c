"""`python -m crashing_edge ARGS`: the real edge-client, with the same arguments, that kills itself
with SIGKILL at a chosen point ($CRASH_EDGE), so that a test hits that point every time:

- `step:N`: the reply to step N has come, its gradient is not applied yet (mid-step; the server
  has applied the step: in the U-shaped split, the reply to its second half);
- `write:N`: the Nth state write has its temporary file written and fsynced, not yet renamed
  over the state file (mid-state-write);
- `epoch:N`: epoch N - 1 is over and its state written, epoch N not begun (between epochs).

Killing from outside would land wherever the process happens to be; these are the moments
that matter. Test-only: nothing of it is in edge-client.
"""

import os
import signal
import sys
from pathlib import Path

from edge_client import cli, state
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _at_step(n: int) -> None:
    collect = RemoteCloud.collect

    def crashing(self, step_id):
        reply = collect(self, step_id)
        if step_id == n and reply.grad is not None:
            _die()
        return reply

    RemoteCloud.collect = crashing


def _at_write(n: int) -> None:
    rename, writes = os.replace, 0

    def crashing(src, dst):
        nonlocal writes
        if Path(dst).name == state.FILE_NAME:
            writes += 1
            if writes == n:
                _die()
        rename(src, dst)

    os.replace = crashing


def _at_epoch(n: int) -> None:
    train_epoch = EdgeTrainer.train_epoch

    def crashing(self):
        if len(self.history) + 1 == n:
            _die()
        return train_epoch(self)

    EdgeTrainer.train_epoch = crashing


if __name__ == "__main__":
    point, n = os.environ["CRASH_EDGE"].split(":")
    {"step": _at_step, "write": _at_write, "epoch": _at_epoch}[point](int(n))
    sys.exit(cli.main())
