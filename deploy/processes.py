"""Start and stop real `cloud-server` processes (demo, sweeps, tests), and run a sweep's short
stages (`run_stage`).

The server prints `cloud-server listening on HOST:PORT` once it serves; with `--port 0`
that line is how the caller learns the port, so nothing races for a fixed one.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

# What a sweep's stages import before their first line of work: torch, torch._dynamo (torch.optim
# imports it on an optimizer's first step), torchvision (after splitnet.compat, which lets it load
# on CPU torch), torchmetrics (the scorer; it imports scipy.signal), scikit-learn's bundled digits
# and grpc. As with multiprocessing's spawn and forkserver methods, each child imports the caller's
# main script (as `__mp_main__`, not as `__main__`), so a script that starts these keeps its work
# under `if __name__ == "__main__":`; console scripts and `python -m` modules do.
STAGE_PRELOAD = ("splitnet.compat", "torch._dynamo", "torchvision", "torchmetrics", "sklearn.datasets", "grpc")
_stages = multiprocessing.get_context("forkserver")


def run_stage(module_args: list[str], log_path: Path, timeout: float, env: dict | None = None) -> int:
    """`python -m MODULE ARGS...` with its output in `log_path`; its exit status (negative: the signal
    that ended it). Raises subprocess.TimeoutExpired once it has been killed at `timeout` seconds.

    A fresh interpreter spends 2.5-4 s of CPU on STAGE_PRELOAD before a stage's first line of work,
    which on the bundled digits is most of an `edge-client`'s, and nearly all of an attacker's
    `score`. A sweep point runs several of them in a row. So the imports happen once, in
    multiprocessing's fork server (started at the first forked process, with the caller's environment), and
    every stage is a child forked from it (`ForkedProcess`): a process of its own with its own pid,
    log, exit status and timeout, as before, started in milliseconds."""
    with open(log_path, "wb") as log:
        stage = ForkedProcess(module_args, log.fileno(), env)
    try:
        return stage.wait(timeout)
    finally:  # at its timeout, or where the caller was interrupted: not left running
        if stage.poll() is None:
            stage.kill()
            stage.wait()


class ForkedProcess:
    """`python -m MODULE ARGS...` as a child of the fork server, its output (stdout and stderr) into
    the file descriptor `out`; what it offers of subprocess.Popen (`pid`, `args`, `poll`, `wait`,
    `send_signal`, `kill`, `terminate`, `returncode`) is what ServerProcess and the callers use.

    What a fresh interpreter would do differently, the child does itself (`_run_forked`). With
    `daemon`, the child is terminated when its parent exits (normally: not when it is killed),
    which a server must be, else multiprocessing would wait for it at the parent's exit; a daemon
    child cannot use multiprocessing itself, which a stage may, so a stage is not one."""

    def __init__(self, module_args: list[str], out: int, env: dict | None = None, daemon: bool = False) -> None:
        _stages.set_forkserver_preload(list(STAGE_PRELOAD))  # for the fork server's start; once it runs, no effect
        self.args = [sys.executable, "-m", *module_args]
        # a Connection is how multiprocessing hands a file descriptor to the child it starts
        carrier = Connection(os.dup(out))
        self._process = _stages.Process(target=_run_forked, name=module_args[0], daemon=daemon,
                                        args=(list(module_args), carrier, {**os.environ, **(env or {})}))
        try:
            self._process.start()
        finally:
            carrier.close()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _run_forked(module_args: list[str], out: Connection, env: dict) -> None:
    """In the forked child: the caller's environment at the call, output to `out` a line at a time,
    numpy's global generator reseeded from the OS as a fresh interpreter's is (every child would
    otherwise draw what its siblings drew), the module run as `__main__`, and the exit handlers
    run at the end (multiprocessing leaves a child with os._exit, which skips them)."""
    os.environ.clear()
    os.environ.update(env)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(out.fileno(), stream.fileno())
        stream.reconfigure(line_buffering=True)
    out.close()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = list(module_args)
    try:
        runpy.run_module(module_args[0], run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()


@dataclass
class ServerProcess:
    proc: subprocess.Popen | ForkedProcess
    address: str
    lines: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)


def start_process(module_args: list[str], ready: str, timeout: float = 60.0, env: dict | None = None,
                  fork: bool = True) -> ServerProcess:
    """`python -m MODULE ARGS...`, waiting for the line that matches `ready` (its group 1: the address).
    Forked from the fork server (`ForkedProcess`: seconds of imports saved where it runs already, as
    in a sweep, or where several are started, as in the tests); with `fork=False`, a fresh
    interpreter, as the benchmarks want: a forked child carries the fork server's imports in its
    memory, and its first steps find them warm."""
    if not fork:
        return start_command([sys.executable, "-m", *module_args], ready, timeout, env, name=module_args[0])
    read, write = os.pipe()
    try:
        proc = ForkedProcess(module_args, write, env, daemon=True)
    finally:
        os.close(write)
    return _ready(proc, open(read, encoding="utf-8", errors="replace"), ready, timeout, module_args[0])


def start_command(command: list[str], ready: str, timeout: float = 60.0, env: dict | None = None,
                  name: str = "", cwd: str | None = None) -> ServerProcess:
    """Any command (an entry point run in another network namespace: tests/test_multihost.py), waiting
    for the line that matches `ready` (its group 1: the address). `name` in errors; default: the command."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return _ready(proc, proc.stdout, ready, timeout, name or " ".join(command))


def _ready(proc: subprocess.Popen | ForkedProcess, output, ready: str, timeout: float, name: str) -> ServerProcess:
    """`proc` once a line of its `output` matches `ready`; its output kept read (and kept) meanwhile."""
    pattern = re.compile(ready)
    lines: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def pump() -> None:  # keep reading so the pipe never fills and blocks the process
        for line in output:
            lines.append(line)
            match = pattern.search(line)
            if match and not found.is_set():
                address.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{name} did not start: {''.join(lines)}")
    if not address:
        proc.wait(5)
        raise RuntimeError(f"{name} exited: {''.join(lines)}")
    return ServerProcess(proc, address[0], lines)


def start_server(*args: str, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0,
                 env: dict | None = None, module: str = "cloud_server", fork: bool = True) -> ServerProcess:
    """A `cloud-server` process; with port 0 its printed address tells the port it took.
    `module`: another entry point that runs the same server (fault-injection tests); `fork`: as in
    start_process."""
    return start_process([module, "--host", host, "--port", str(port), *args],
                         r"cloud-server listening on (\S+:\d+)", timeout, env, fork)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (its children, theirs, ...), from the parent links in /proc (Linux):
    what a command started, Ray's processes and its workers among them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found
