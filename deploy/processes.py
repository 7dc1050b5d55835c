"""Start and stop real `cloud-server` processes (demo, sweeps, tests).

The server prints `cloud-server listening on HOST:PORT` once it serves; with `--port 0`
that line is how the caller learns the port, so nothing races for a fixed one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class ServerProcess:
    proc: subprocess.Popen
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


def start_process(module_args: list[str], ready: str, timeout: float = 60.0,
                  env: dict | None = None) -> ServerProcess:
    """`python -m MODULE ARGS...`, waiting for the line that matches `ready` (its group 1: the address)."""
    return start_command([sys.executable, "-m", *module_args], ready, timeout, env, name=module_args[0])


def start_command(command: list[str], ready: str, timeout: float = 60.0, env: dict | None = None,
                  name: str = "", cwd: str | None = None) -> ServerProcess:
    """Any command (an entry point run in another network namespace: tests/test_multihost.py), waiting
    for the line that matches `ready` (its group 1: the address). `name` in errors; default: the command."""
    name = name or " ".join(command)
    pattern = re.compile(ready)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def pump() -> None:  # keep reading so the pipe never fills and blocks the process
        for line in proc.stdout:  # type: ignore[union-attr]
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
                 env: dict | None = None, module: str = "cloud_server") -> ServerProcess:
    """A `cloud-server` process; with port 0 its printed address tells the port it took.
    `module`: another entry point that runs the same server (fault-injection tests)."""
    return start_process([module, "--host", host, "--port", str(port), *args],
                         r"cloud-server listening on (\S+:\d+)", timeout, env)


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
