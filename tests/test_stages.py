"""A sweep's stages and the servers the sweeps and tests start run as children forked from a process
that imported torch once (`deploy.processes.run_stage`, `start_process`): each must still behave as
the fresh `python -m` it replaces, with its own process, output, exit status, environment, random
draws, exit handlers and timeout, and end with the process that started it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from deploy.processes import ForkedProcess, run_stage, start_process

STAGE = """
import atexit, os, sys, time
import numpy
print("argv", sys.argv[1:])
print("pid", os.getpid())
print("setting", os.environ.get("STAGE_SETTING"))
print("draw", numpy.random.randint(1 << 30))
print("torch imported before", "torch" in sys.modules)
atexit.register(lambda: print("exit handler ran"))
if sys.argv[1] == "fail":
    raise ValueError("the stage's own last words")
if sys.argv[1] == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def stage_module(tmp_path, monkeypatch):
    (tmp_path / "a_stage.py").write_text(STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))  # a child gets the caller's sys.path at the call
    return "a_stage"


def lines_of(log) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in log.read_text().splitlines() if " " in line)


def test_a_stage_is_a_process_of_its_own_with_its_output_status_and_environment(stage_module, tmp_path):
    log = tmp_path / "stage.log"
    status = run_stage([stage_module, "3", "--flag"], log, timeout=60, env={"STAGE_SETTING": "from the call"})
    assert status == 3
    out = lines_of(log)
    assert out["argv"] == "['3', '--flag']" and int(out["pid"]) != os.getpid()
    assert out["setting"] == "from the call"
    assert out["torch"] == "imported before True"  # what a stage does not pay for again
    assert out["exit"] == "handler ran"  # a fresh interpreter runs them; a forked child must too
    # the caller's environment at the call, not at the fork server's start
    os.environ["STAGE_SETTING"] = "changed since"
    try:
        assert run_stage([stage_module, "0"], log, timeout=60) == 0
    finally:
        del os.environ["STAGE_SETTING"]
    assert lines_of(log)["setting"] == "changed since"


def test_sibling_stages_do_not_repeat_each_others_random_draws(stage_module, tmp_path):
    draws = set()
    for i in range(3):
        assert run_stage([stage_module, "0"], tmp_path / f"{i}.log", timeout=60) == 0
        draws.add(lines_of(tmp_path / f"{i}.log")["draw"])
    assert len(draws) == 3


def test_a_failing_stage_exits_1_with_its_traceback_in_its_log(stage_module, tmp_path):
    log = tmp_path / "stage.log"
    assert run_stage([stage_module, "fail"], log, timeout=60) == 1
    text = log.read_text()
    assert "Traceback" in text and text.rstrip().endswith("ValueError: the stage's own last words")


def test_a_stage_past_its_timeout_is_killed_and_says_so(stage_module, tmp_path):
    log = tmp_path / "stage.log"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_stage([stage_module, "sleep"], log, timeout=1)
    assert time.monotonic() - started < 30
    pid = int(lines_of(log)["pid"])
    assert "sleeping" in log.read_text()  # a line at a time: what it wrote before it was killed is there
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


SERVER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("serving", os.getpid(), "listening on here:1 ->", sys.argv[1:])
time.sleep(120)
"""


def test_a_forked_server_reports_its_address_keeps_its_output_and_stops_on_sigterm(tmp_path, monkeypatch):
    (tmp_path / "a_server.py").write_text(SERVER)
    monkeypatch.syspath_prepend(str(tmp_path))
    server = start_process(["a_server", "--flag"], r"listening on (\S+) ->")
    assert isinstance(server.proc, ForkedProcess) and server.address == "here:1"
    assert server.proc.pid != os.getpid() and f"serving {server.proc.pid} " in server.output()
    assert "['--flag']" in server.output() and server.proc.poll() is None
    assert server.stop() == 0  # its own SIGTERM handler's exit status, as a fresh process would give
    fresh = start_process(["a_server"], r"listening on (\S+) ->", env={"PYTHONPATH": str(tmp_path)}, fork=False)
    assert isinstance(fresh.proc, subprocess.Popen)
    assert fresh.stop(signal.SIGKILL) == -signal.SIGKILL


def test_a_forked_server_left_running_ends_with_its_parent(tmp_path):
    """multiprocessing waits at exit for the children it started unless they are daemons: a server a
    caller forgot to stop must neither hold the caller's exit nor outlive it."""
    (tmp_path / "a_server.py").write_text(SERVER)
    parent = f"""
import sys
sys.path[:0] = [{str(tmp_path)!r}]
from deploy.processes import start_process
server = start_process(["a_server"], r"listening on (\\S+) ->")
print(server.proc.pid, flush=True)
"""
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the forked server outlived the process that started it")
