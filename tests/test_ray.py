"""Many edge clients as Ray actors against a real cloud-server process, all on 127.0.0.1.

Ray runs in this process, the worker's cluster (conftest.py's `ray_local`, tests/ray_cluster.py:
`ray.init` / `ray.shutdown`, never `ray stop`, which would stop every Ray process on the machine).
Its environment is set before Ray is imported (conftest.py imports tests/ray_cluster.py first).
"""

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import torch
from torch.utils.data import Subset, TensorDataset

from deploy.sim import partition
from deploy.sim.config import Kill, PartitionSpec, RayRunConfig
from deploy.sim.fedavg import fedavg
from deploy.processes import descendants
from cloud_server.local import LocalCloud
from deploy.sim.run import run_clients
from edge_client.config import EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import EdgeTrainer, run
from ray_cluster import EPOCHS, RAY_ENV, edge
from splitnet import data

MAX_DROP = 0.03  # test accuracy points a mode may lose against one client with all the data


@pytest.fixture(scope="module")
def single(server):
    """One edge client (in this process) with the whole training set: what the modes are held to."""
    config = edge(server, "single")
    return run(config, RemoteCloud(config.connection))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "parallel", "splitfed"])
def test_three_clients_train(ray_local, server, single, mode):
    report = run_clients(RayRunConfig(edge(server, f"three-{mode}"), clients=3, mode=mode))
    clients = report["client_reports"]
    assert report["mode"] == mode and report["clients"] == 3 and not report["failed"]
    assert len({c["client_id"] for c in clients}) == 3
    assert sum(c["shard_size"] for c in clients) == len(data.load(data.DataSpec()).train)
    assert all(c["status"] == "ok" and c["epochs"] == EPOCHS and c["bytes_up"] > 0 for c in clients)
    # exactly once, end to end: every step a client sent was applied once by the shared decoder
    assert report["server_steps_applied"] == report["client_steps_sent"] == sum(c["steps"] for c in clients)
    assert all(c["server_last_step"] == c["steps"] for c in clients)
    assert all(c["lr_mismatch_steps"] == 0 for c in clients)  # each client's schedule, step for step
    if mode != "parallel":  # one shared encoder at the end
        assert len({c["test_accuracy"] for c in clients}) == 1
    drop = single["test_accuracy"] - report["test_accuracy"]
    assert drop <= MAX_DROP, (report["test_accuracy"], single["test_accuracy"])
    assert report["bytes_up"] == sum(c["bytes_up"] for c in clients) and report["samples_per_second"] > 0


@pytest.mark.slow
def test_killed_client_leaves_the_others_finishing(ray_local, server):
    report = run_clients(RayRunConfig(edge(server, "kill", epochs=3), clients=3, mode="splitfed", kill=Kill(1, 2)))
    victim, *others = sorted(report["client_reports"], key=lambda c: c["index"] != 1)
    assert report["failed"] == [victim["client_id"]] and report["clients_ok"] == 2
    assert victim["status"] == "failed" and "kill" in victim["error"].lower()
    assert victim["test_accuracy"] is None
    assert all(c["status"] == "ok" and c["error"] is None and c["epochs"] == 3 for c in others)
    assert report["test_accuracy"] == others[0]["test_accuracy"] is not None
    # Killed in round 2, once the server had applied a step of it: the client reported round 1
    # only, so the server holds steps it never reported (unless, on a very slow machine, the
    # round ended before the kill landed: then it reported round 2 and died before round 3).
    assert (victim["epochs"], victim["server_last_step"] > victim["steps"]) in {(1, True), (2, False)}
    assert report["server_steps_applied"] == sum(c["server_last_step"] for c in report["client_reports"])
    assert report["client_steps_sent"] == sum(c["steps"] for c in report["client_reports"])
    # where each client ran, the killed one included, and the cluster it could have gone to
    (node,) = report["ray_nodes"]
    assert node["node_ip"] == "127.0.0.1" and node["cpus"] == 2 and node["node_id"] == ray.nodes()[0]["NodeID"]
    assert all((c["node_id"], c["node_ip"]) == (node["node_id"], "127.0.0.1") for c in report["client_reports"])


def test_workers_inherit_the_ray_environment(ray_local):
    """Started without a runtime_env, the cluster's workers still see every variable the driver set
    before importing Ray (deploy.sim.config.runtime_env)."""

    @ray.remote(num_cpus=0)
    def environment() -> dict:
        return {k: os.environ.get(k) for k in RAY_ENV}

    assert ray.get(environment.remote(), timeout=120) == RAY_ENV


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")
def test_ray_listens_on_loopback_only(ray_local):
    """Every TCP socket this test's Ray processes (GCS, raylet, workers) listen on is a loopback one."""
    ours = descendants(os.getpid())
    lines = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    listening = [line.split()[3] for line in lines if ours & {int(p) for p in re.findall(r"pid=(\d+)", line)}]
    assert listening
    hosts = [ipaddress.ip_address(addr.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")) for addr in listening]
    assert all(h.is_loopback for h in hosts), listening


@pytest.mark.slow
def test_one_command_run_starts_and_stops_its_server(tmp_path):
    """`split-ray --start-server`: its own Ray on 127.0.0.1 and its own cloud-server, both gone after;
    with `--log-dir` the actors write beside each other, one TensorBoard run per client, each its
    own history."""
    from tb_events import events, scalars

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        done = subprocess.run([sys.executable, "-m", "deploy.sim.cli", "--clients", "2", "--start-server", "--epochs",
                               "2", "--mode", "splitfed", "--partition", "dirichlet:1",
                               "--report", f"{temp}/ray.json", "--log-dir", str(tmp_path / "tb")],
                              env={**os.environ, "RAY_TMPDIR": temp}, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(open(f"{temp}/ray.json").read())
        rows = [json.loads(line) for line in open(f"{temp}/ray.clients.jsonl")]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert report["partition"] == "dirichlet:1" and report["clients_ok"] == 2 and report["mode"] == "splitfed"
    assert report["server_steps_applied"] == report["client_steps_sent"] == sum(r["steps"] for r in rows) > 0
    # aggregates in the report, a row per client beside it
    assert report["client_rows"] == "ray.clients.jsonl" and "client_reports" not in report
    assert [r["index"] for r in rows] == [0, 1] and "test_accuracy" in done.stdout
    with socket.socket() as probe:  # the server it started is gone
        assert probe.connect_ex(("127.0.0.1", int(report["server"].rsplit(":", 1)[1]))) != 0
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["client-0", "client-1"]
    for client in rows:
        acc = events(tmp_path / "tb" / f"client-{client['index']}")
        loss = scalars(acc, "train/loss")
        assert sorted(loss) == [1, 2] and loss[2] == pytest.approx(client["train_loss"], rel=1e-6)
        assert scalars(acc, "test/accuracy") == pytest.approx({2: client["test_accuracy"]}, rel=1e-6)
    assert scalars(events(tmp_path / "tb" / "client-0"), "train/loss") != \
        scalars(events(tmp_path / "tb" / "client-1"), "train/loss")  # two shards, two histories


# -- pure parts


def test_dirichlet_partition_is_a_skewed_cover():
    labels = data.load(data.DataSpec()).train.tensors[1]
    skews = {}
    for alpha in (100.0, 1.0, 0.1):
        parts = partition.split(labels, 5, PartitionSpec("dirichlet", alpha), seed=3)
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(len(labels)))  # disjoint, and covers every sample
        assert all(parts)
        assert parts == partition.split(labels, 5, PartitionSpec("dirichlet", alpha), seed=3)
        skews[alpha] = partition.label_skew(labels, parts)
    assert skews[100.0] < skews[1.0] < skews[0.1]
    iid = partition.split(labels, 5, PartitionSpec.parse("iid"))
    assert partition.label_skew(labels, iid) < 0.1 < skews[0.1]
    tiny = partition.split(labels, 40, PartitionSpec("dirichlet", 0.01))
    assert all(tiny) and sorted(i for p in tiny for i in p) == list(range(len(labels)))


def test_iid_partition_matches_single_client_shards():
    labels = torch.arange(10) % 3
    parts = partition.split(labels, 3, PartitionSpec.parse("iid"), seed=1)
    assert parts == [data.shard(TensorDataset(labels), i, 3, seed=1).indices for i in range(3)]


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "zipf:1", "iid:2"])
def test_partition_parse_errors(text):
    with pytest.raises(ValueError):
        PartitionSpec.parse(text)


def test_fedavg_weights_by_shard_size_and_adds_batch_counts():
    base = {"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(10)}
    a = {"w": torch.tensor([1.0, 1.0]), "bn.num_batches_tracked": torch.tensor(13)}
    b = {"w": torch.tensor([4.0, -2.0]), "bn.num_batches_tracked": torch.tensor(11)}
    avg = fedavg([a, b], [2, 1], base)
    assert torch.allclose(avg["w"], torch.tensor([2.0, 0.0]))
    assert avg["bn.num_batches_tracked"].item() == 14 and avg["bn.num_batches_tracked"].dtype == torch.long


def test_fedavg_pools_batch_norm_variance_of_the_union():
    """Two clients' exact (biased) channel statistics pool into those of their data together."""
    xa, xb = torch.randn(300, 3) + 2.0, torch.randn(100, 3) * 3.0 - 1.0
    base = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    states = [{"bn.running_mean": x.mean(0), "bn.running_var": x.var(0, unbiased=False)} for x in (xa, xb)]
    pooled = fedavg(states, [300, 100], base)
    union = torch.cat([xa, xb])
    assert torch.allclose(pooled["bn.running_mean"], union.mean(0), atol=1e-5)
    assert torch.allclose(pooled["bn.running_var"], union.var(0, unbiased=False), atol=1e-4)
    assert not torch.allclose(pooled["bn.running_var"], 0.75 * states[0]["bn.running_var"] + 0.25 * states[1]["bn.running_var"])


def test_recalibrated_batch_norm_describes_the_averaged_encoder():
    """After FedAvg the averaged running statistics are not the averaged encoder's; a recalibration
    makes the eval-mode output match the batch statistics of that encoder on the client's data."""
    splits = data.load(data.DataSpec())
    trainer = EdgeTrainer(EdgeConfig(progress=False), LocalCloud(), splits, Subset(splits.train, range(512)))
    bn = next(m for m in trainer.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(9.0)
    x = torch.stack([splits.train[i][0] for i in range(512)])
    trainer.recalibrate_batch_norm()
    assert trainer.encoder.training  # left as it was
    inputs = trainer.encoder[0][0](x)  # what the first batch norm sees
    assert torch.allclose(bn.running_mean, inputs.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, inputs.var((0, 2, 3)), rtol=0.02)


def test_cluster_yaml_is_valid_for_the_launcher():
    """What `ray up` checks first: Ray's own schema, after it fills in the local provider's defaults."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config  # Ray is pinned exactly

    config = prepare_config(yaml.safe_load((Path(__file__).parents[1] / "deploy" / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    install = " ".join(config["setup_commands"])
    # torch first, from the CPU index; both steps take their exact versions from constraints.txt
    assert install.index("--index-url https://download.pytorch.org/whl/cpu torch torchvision") \
        < install.index("-e ~/splitnet'[all]'")
    assert install.count("-c ~/splitnet/constraints.txt") == 2


def test_run_config_checks():
    config = EdgeConfig(epochs=2)
    with pytest.raises(ValueError, match="mode"):
        RayRunConfig(config, mode="ring")
    with pytest.raises(ValueError, match="no such client"):
        RayRunConfig(config, clients=2, kill=Kill(2, 1))
    with pytest.raises(ValueError, match="CLIENT@ROUND"):
        Kill.parse("1")
    assert Kill.parse("1@2") == Kill(1, 2)
