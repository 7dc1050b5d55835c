"""What the test modules share: the services of a pytest-xdist worker (one cloud-server, one Ray
cluster) and the `slow` marker. Helpers that tests import live in helper modules beside this one
(messages.py, certs.py, ray_cluster.py, tb_events.py, ...); no test module imports another
(tests/test_layout.py checks it)."""

import pytest
import torch

from deploy.processes import start_process, start_server
from ray_cluster import Cluster  # importing it sets Ray's environment, before any test module imports Ray
from sweeps import SharedServices

torch.set_num_threads(1)  # the test servers run beside us on the same cores (see splitnet.cli_util.set_threads)


@pytest.fixture(scope="session")
def server_checkpoints(tmp_path_factory):
    """The `server` fixture's --checkpoint-dir: a job's checkpoint is FILE_STEM(JOB).ckpt in it."""
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def server(server_checkpoints):
    """A real cloud-server process on 127.0.0.1 shared by every test of a pytest-xdist worker, whatever
    its file (each test uses jobs of its own names): a server start is seconds of CPU, most of it
    importing torch."""
    proc = start_server("--checkpoint-dir", str(server_checkpoints))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def sweep_services(server, tmp_path_factory):
    """The services a sweep starts (deploy.experiments.runner.Services), shared by the worker's sweeps
    that run in the test process (tests/sweeps.py): the `server` fixture, and the eavesdropping proxy
    in front of it capturing into a folder of its own."""
    capture = tmp_path_factory.mktemp("sweep-capture")
    proxy = start_process(["attacks", "proxy", "--listen", "127.0.0.1:0", "--upstream", server.address, "--capture",
                           str(capture)], r"listening on (\S+) ->")
    yield SharedServices(server, proxy, str(capture))
    proxy.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """The worker's Ray cluster, started by the first test that asks for `ray_local` and shut down at
    the end of the session: every Ray test module of the worker runs on it (a start is seconds of
    CPU: Ray's GCS, raylet and workers)."""
    cluster = Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def ray_local(ray_cluster):
    """Ray on 127.0.0.1 in this process (tests/ray_cluster.py): the worker's cluster, started if need be."""
    ray_cluster.start()
    return ray_cluster


@pytest.fixture
def without_ray(ray_cluster):
    """No Ray in this process, for a test whose code starts and shuts down a Ray of its own (`ray.init`
    refuses a second one); the next test that asks for `ray_local` starts the worker's cluster again."""
    ray_cluster.stop()


# Fixtures that train or start Ray or processes: a test that uses one is slow whatever its own body does
# (tests/test_layout.py checks that each is a fixture of tests/).
HEAVY_FIXTURES = {"attacked", "proxy", "ray_local", "single", "digits_sweep", "sweep_services", "target",
                  "sigmoid_target"}


# The slowest test files, slowest first (each file's summed test times, setup included, in a run of
# `make test`; README, "Tests"): they run first, so that at the end of `make test` no worker is left
# alone on a long file while the others have nothing to do. `make test` keeps this order
# (--no-loadscope-reorder): pytest-xdist's own hands out the files with the most tests first, which
# put these (a few tests each: sweeps, Ray clusters, namespace hosts, process restarts) at the end.
# tests/test_layout.py checks that each names a file there is.
SLOWEST_FIRST = ("test_ray.py", "test_edge_resume.py", "test_multihost.py", "test_ray_virtual.py", "test_faults.py",
                 "test_u_shaped.py", "test_attacker.py", "test_hijack.py", "test_fuzz.py", "test_sweep.py",
                 "test_sweep_two_phase.py", "test_sweep_resume.py", "test_attacks.py", "test_sweep_runs.py",
                 "test_multihost_link.py", "test_resume.py", "test_split_training.py", "test_security.py",
                 "test_infer.py", "test_stages.py", "test_checkpoints.py", "test_examples.py", "test_load.py",
                 "test_continuation.py", "test_link.py", "test_defense_runs.py", "test_cli_errors.py",
                 "test_job_eviction.py", "test_tracking.py", "test_adversarial.py", "test_schedule.py",
                 "test_multihost_faults.py", "test_multihost_flood.py")  # the last two: make test-hosts


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if HEAVY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together, in order
