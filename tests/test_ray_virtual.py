"""Virtual clients over a bounded pool of Ray worker actors against a real cloud-server process
(`split-ray --workers`), on 127.0.0.1, on the worker's Ray cluster (conftest.py's `ray_local`); a
file of its own so that the suite's workers share the Ray tests (tests/test_virtual_clients.py has
the parts that need no Ray)."""

import threading
from collections import Counter
from typing import Callable

import pytest

from deploy.sim.run import run_clients
from deploy.sim.config import Kill, RayRunConfig, VirtualClients
from deploy.sim.virtual import ClientSpec, VirtualClient, _Call, _Pool
from ray_cluster import edge


@pytest.mark.parametrize("mode", ["sequential", "parallel", "splitfed"])
def test_fifty_virtual_clients_over_two_workers(ray_local, server, mode):
    config = RayRunConfig(edge(server, f"virtual-{mode}", epochs=2), clients=50, mode=mode,
                          virtual=VirtualClients(workers=2, fraction=0.2))
    report = run_clients(config)
    clients = report["client_reports"]
    assert (report["workers"], report["clients_ok"], report["failed"], report["retries"]) == (2, 50, [], 0)
    assert [r["participants"] for r in report["rounds"]] == [10, 10]
    turns = Counter(i for taking_part in config.participants() for i in taking_part)
    assert all(c["turns"] == turns[c["index"]] for c in clients)
    # Each client's steps under its own id, each applied once (a shard of 28-29 images is one step a
    # turn; a client never sampled has none); every turn ended with its steps in a server checkpoint.
    assert all((c["steps"] or 0) == c["turns"] == c["server_last_step"] for c in clients)
    assert report["server_steps_applied"] == report["client_steps_sent"] == 20
    assert all(c["durable"] for c in clients if c["turns"])
    if mode == "parallel":  # every client evaluated its own encoder through its own session
        assert all(c["bytes_down"] and c["test_accuracy"] is not None for c in clients)
    else:  # one shared encoder, evaluated once
        assert len({c["test_accuracy"] for c in clients}) == 1
    assert 0 < report["test_accuracy"] <= 1 and report["state_bytes_mean"] > 0
    # where each client last ran (a turn or the evaluation; nowhere for one that ran neither), and the
    # cluster at the start
    (node,) = report["ray_nodes"]
    assert node["node_ip"] == "127.0.0.1" and node["cpus"] == 2
    assert all((c["node_id"], c["node_ip"]) == ((node["node_id"], "127.0.0.1") if c["bytes_down"] else (None, None))
               for c in clients)
    assert all(c["node_ip"] for c in clients if c["turns"])


def test_a_worker_killed_mid_turn_has_the_turn_run_again_on_another(ray_local, server, tmp_path):
    """The victim's turn runs again from its state before the turn (here a file of the spill folder):
    the steps the dead worker had sent go out again under their ids, answered as duplicates, so each
    client ends with exactly its steps, none lost and none applied twice."""
    steps = 12  # a turn; at 4 images a step the kill lands within it
    config = RayRunConfig(edge(server, "virtual-kill", epochs=2, batch_size=4), clients=4, mode="parallel",
                          kill=Kill(1, 2), virtual=VirtualClients(workers=2, local_steps=steps, spill_dir=str(tmp_path)))
    report = run_clients(config)
    clients = report["client_reports"]
    assert (report["failed"], report["retries"], report["workers_replaced"]) == ([], 1, 1)
    assert clients[1]["retries"] == 1 and clients[1]["resent_steps"] >= 1
    assert all(c["steps"] == c["server_last_step"] == 2 * steps for c in clients)
    assert report["server_steps_applied"] == report["client_steps_sent"] == 4 * 2 * steps
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{c['client_id']}.{2 * steps}.pt" for c in clients)


def _pool_whose_first_worker_dies(ray, worker_class) -> tuple[_Pool, list, list, Callable]:
    """Two workers of `worker_class`, six calls, and a `started` hook that kills worker 0 as it
    takes its first call; its replacement needs a resource no node has, so Ray keeps it pending,
    as after a node's death. Returns the pool, the calls, the actors started and the hook."""
    starts: list = []

    def start():
        options = {"num_cpus": 0.5} if len(starts) < 2 else {"resources": {"a-node-that-died": 1}}
        starts.append(ray.remote(worker_class).options(**options).remote())
        return starts[-1]

    pool = _Pool(2, start)
    victim = ray.get(pool.workers[0].__ray_ready__.remote()) and pool.workers[0]
    calls = [_Call(VirtualClient(i, f"c{i}", 0, ClientSpec(i, f"c{i}", 0, [], 1)), "work", (i,)) for i in range(6)]

    def kill_first(call: _Call, worker) -> None:
        if worker is victim and call.failed_on is None:
            ray.kill(worker, no_restart=True)

    return pool, calls, starts, kill_first


def test_a_replacement_worker_that_cannot_start_takes_no_calls(ray_local):
    """A worker's node dies and no node can hold its replacement: the pool's calls, the failed one
    among them, run on the workers still running instead of waiting for the replacement forever
    (tests/test_multihost_faults.py unplugs a real node)."""
    class Echo:  # defined here: Ray ships it by value (the workers cannot import a test module)
        def work(self, x: int) -> int:
            return x

    pool, calls, starts, kill_first = _pool_whose_first_worker_dies(pytest.importorskip("ray"), Echo)
    done = list(pool.run(calls, limit=2, started=kill_first))
    assert sorted((call.client.spec.index, result, error) for call, result, _, error in done) == \
        [(i, i, "") for i in range(6)]
    assert pool.replaced == 1 and len(starts) == 3
    assert sum(call.client.retries for call in calls) == 1
    assert list(pool._starting) == [0]  # the replacement is still pending; nothing waited on it
    pool.stop()


def test_a_call_that_fails_on_the_only_started_worker_runs_there_again(ray_local):
    """As above, and then a call fails on the one worker left (a turn's NOT_FOUND after the cable of
    the other node was pulled, in tests/test_multihost_faults.py): it ran "on another worker", and
    the only other was the replacement that could not start: the run waited for it until killed."""
    class FailsOnce:  # defined here: Ray ships it by value
        def __init__(self) -> None:
            self.failed = False

        def work(self, x: int) -> int:
            if x == 3 and not self.failed:
                self.failed = True
                raise ValueError("the server closed this session")
            return x

    pool, calls, _, kill_first = _pool_whose_first_worker_dies(pytest.importorskip("ray"), FailsOnce)
    done: list = []
    runner = threading.Thread(target=lambda: done.extend(pool.run(calls, limit=2, started=kill_first)), daemon=True)
    runner.start()
    runner.join(120)
    assert not runner.is_alive(), f"the pool waited for a worker that cannot start; done so far: {len(done)}"
    assert sorted((call.client.spec.index, result, error) for call, result, _, error in done) == \
        [(i, i, "") for i in range(6)]
    # one call ran again because its worker died (the first the victim took, or the next where the
    # first ended before the kill landed), and call 3 because it failed
    assert calls[3].client.retries == 1 and sum(call.client.retries for call in calls) == 2
    pool.stop()
