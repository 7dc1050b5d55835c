import os

import pytest

from deploy.processes import start_server

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def server(tmp_path):
    """A real cloud-server process on 127.0.0.1, with checkpoints in tmp_path."""
    proc = start_server("--checkpoint-dir", str(tmp_path / "ckpt"))
    yield proc
    proc.stop()
