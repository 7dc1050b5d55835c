"""Running `split-sweep` in the test process: what the sweep tests share (tests/test_sweep.py,
tests/test_sweep_runs.py, tests/test_sweep_two_phase.py).

In the test process a sweep skips the start-up of a process of its own (Python importing torch
and matplotlib, seconds of CPU), and with `services` its points run against conftest.py's
`sweep_services`, a worker's shared cloud-server and proxy, instead of a server and proxy it
starts and stops itself (seconds of CPU more, each). The points are real processes either way
(edge-client, `attacker run` / `score`, a `split-link`). The sweeps that kill their services or
need the server's checkpoints in their own out/jobs (tests/test_sweep_resume.py, the bases of
tests/test_sweep_two_phase.py) run `python -m deploy.experiments.sweep` with services of their own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
from dataclasses import dataclass

import pytest

from deploy.processes import ServerProcess


@dataclass
class SharedServices:
    """What deploy.experiments.runner.Services holds, shared between sweeps: each point is a job of its own
    name on the server, and its attacks read only its own session from the proxy's capture."""

    server: ServerProcess
    proxy: ServerProcess
    capture: str

    def stop(self) -> None:
        """Left running for the next sweep: the fixture that started them stops them."""


def sweep_here(argv: list[str], services: SharedServices | None = None) -> subprocess.CompletedProcess:
    """`split-sweep ARGV` in this process, its exit status and its output as its process would have
    them: stdout, and stderr with the log lines (at INFO, as its logging setup writes them there).
    With `services`, on those instead of a server and proxy of its own."""
    from deploy.experiments import runner, sweep

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("deploy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            patch.setattr(sweep, "setup_logging", lambda verbose=False: None)  # the handler above stands in
            if services is not None:
                patch.setattr(runner, "Services", lambda out, jobs: services)
            try:
                code = sweep.main(argv)
            except SystemExit as exit_:  # argparse's error exit
                code = exit_.code
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return subprocess.CompletedProcess(["split-sweep", *argv], code, out.getvalue(), err.getvalue())
