import os

import pytest
import torch

from deploy.processes import start_server

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)  # the test servers run beside us on the same cores (see splitnet.cli_util.set_threads)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real cloud-server process on 127.0.0.1 shared by every test of a pytest-xdist worker, whatever
    its file (each test uses jobs of its own names): a server start is seconds of CPU, most of it
    importing torch."""
    proc = start_server("--checkpoint-dir", str(tmp_path_factory.mktemp("ckpt")))
    yield proc
    proc.stop()


# Module fixtures that train or start Ray: a test that uses one is slow whatever its own body does.
HEAVY_FIXTURES = {"attacked", "proxy", "ray_local", "single", "digits_sweep", "target", "sigmoid_target"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if HEAVY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
