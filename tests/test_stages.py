"""A sweep's stages run as children forked from a process that imported torch once
(`deploy.processes.run_stage`): each must still behave as the fresh `python -m` it replaces, with
its own process, output, exit status, environment, random draws, exit handlers and timeout."""

import os
import subprocess
import time

import pytest

from deploy.processes import run_stage

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
        run_stage([stage_module, "sleep"], log, timeout=3)
    assert time.monotonic() - started < 30
    pid = int(lines_of(log)["pid"])
    assert "sleeping" in log.read_text()  # a line at a time: what it wrote before it was killed is there
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
