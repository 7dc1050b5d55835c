"""benchmarks/scale.py's bookkeeping, without a run: which processes `--hosts` counts, what it checks."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.scale import checks, in_namespaces

RUN = {"failed": 0, "server_steps_applied": 300, "client_steps_sent": 300,
       "clients_by_node": {"10.79.0.3": 150, "10.79.0.4": 150}}


def test_in_namespaces_lists_the_processes_of_a_network_namespace() -> None:
    mine = Path(f"/proc/{os.getpid()}/ns/net").stat().st_ino
    found = in_namespaces({mine})
    assert os.getpid() in found
    assert not in_namespaces({0})


def test_checks_name_unequal_steps_failures_and_one_node() -> None:
    assert checks(RUN, hosts=True) == []
    assert checks({**RUN, "client_steps_sent": 299}, hosts=False) == ["server applied 300 steps, clients sent 299"]
    assert checks({**RUN, "failed": 2}, hosts=False) == ["2 clients failed"]
    one = {**RUN, "clients_by_node": {"10.79.0.3": 300}}
    assert checks(one, hosts=False) == [] and checks(one, hosts=True) == ["clients ran on ['10.79.0.3'] only"]
