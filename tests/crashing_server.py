"""`python -m crashing_server ARGS`: the real cloud-server, with the same arguments, that kills
itself with SIGKILL right after its Nth checkpoint rename (N: $CRASH_AFTER_RENAME).

That is the worst moment for a crash: the step is durable, so the restarted server counts it
as applied, but its reply (and, with pipelining, the replies before it) never reached the edge.
Polling the file from outside lands later, after more steps, where nothing is at stake.
"""

import os
import signal
import sys

from cloud_server import cli


def _crash_after(renames: int):
    rename, done = os.replace, 0

    def replace(src, dst):
        nonlocal done
        rename(src, dst)
        done += 1
        if done == renames:
            os.kill(os.getpid(), signal.SIGKILL)

    return replace


if __name__ == "__main__":
    os.replace = _crash_after(int(os.environ["CRASH_AFTER_RENAME"]))
    sys.exit(cli.main())
