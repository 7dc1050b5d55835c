"""Split training over real gRPC against real cloud-server processes on 127.0.0.1."""

import dataclasses
import json
import subprocess
import sys
import threading
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud_server.local import LocalCloud
from deploy.processes import start_server
from edge_client import cli as edge_cli
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run
from splitnet import codec, wire
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import rejected, spec, step

REPORT_KEYS = {"test_accuracy", "train_loss", "epochs", "steps", "train_samples", "bytes_up", "bytes_down",
               "wall_seconds", "samples_per_second", "rtt_ms_p50", "rtt_ms_p99", "codec", "grad_codec", "arch", "cut"}


def edge_config(address: str, **kw) -> EdgeConfig:
    kw.setdefault("epochs", 1)
    return EdgeConfig(connection=ConnectionConfig(server=address, deadline_s=30, reconnect_s=60), progress=False,
                      **kw)


class Recorded:
    """A cloud whose step replies are kept, so that two runs can be compared step by step."""

    def __init__(self, cloud) -> None:
        self.cloud, self.losses, self.grads = cloud, [], []

    def collect(self, step_id):
        reply = self.cloud.collect(step_id)
        self.losses.append(reply.loss)
        self.grads.append(reply.grad)
        return reply

    def __getattr__(self, name):
        return getattr(self.cloud, name)


@pytest.mark.slow
@pytest.mark.parametrize("codec_name,grad_codec", [("fp32", "fp32"), ("int8", "int8")])
def test_remote_training_equals_single_process(server, codec_name, grad_codec):
    """Same seed and codecs both ways: the in-process run is the gRPC run, step for step.

    Exact equality, not a tolerance: both sides run the same single-threaded torch code on the
    same values, so any difference is a step the two paths treat differently. With int8 that
    includes quantising the features and gradients: an in-process run that skipped the codec
    would train on fp32 values and part from the wire run at the first step.
    """
    config = edge_config(server.address, max_steps=8, job=f"equal-{codec_name}", codec=codec_name,
                         grad_codec=grad_codec)
    remote = Recorded(RemoteCloud(config.connection))
    local = Recorded(LocalCloud())
    remote_report, local_report = run(config, remote), run(config, local)
    assert remote_report["steps"] == local_report["steps"] == 8
    assert remote.losses == local.losses
    assert all(torch.equal(a, b) for a, b in zip(remote.grads, local.grads, strict=True))
    assert remote_report["test_accuracy"] == local_report["test_accuracy"]
    # The same messages, less the session id (32 characters on a server, "local" here) and the
    # acknowledgement varint: within 0.1 %.
    feature_bytes = remote_report["train_samples"] * 32 * 8 * 8 * (1 if codec_name == "int8" else 4)
    assert remote_report["bytes_up"] > feature_bytes
    assert local_report["bytes_up"] == pytest.approx(remote_report["bytes_up"], rel=1e-3)
    assert local_report["bytes_down"] == pytest.approx(remote_report["bytes_down"], rel=1e-3)


@pytest.mark.slow
def test_cli_report_and_codecs(server, tmp_path, capsys):
    """edge-client as a process of its own for fp32; for the other codecs its main in this process (a
    process start is seconds of CPU, a torch import and more)."""
    sizes = {}
    for name in ("fp32", "fp16", "int8"):
        path = tmp_path / f"{name}.json"
        argv = ["--server", server.address, "--epochs", "1", "--max-steps", "6", "--codec", name, "--grad-codec", "fp16",
                "--job", f"c-{name}", "--report", str(path), "--no-progress"]
        if name == "fp32":
            done = subprocess.run([sys.executable, "-m", "edge_client", *argv], capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr
            stdout = done.stdout
        else:
            assert edge_cli.main(argv) == 0
            stdout = capsys.readouterr().out
        report = json.loads(path.read_text())
        assert REPORT_KEYS <= report.keys()
        assert report["codec"] == name and report["grad_codec"] == "fp16" and report["steps"] == 6
        assert 0 <= report["test_accuracy"] <= 1 and report["rtt_ms_p50"] <= report["rtt_ms_p99"]
        sizes[name] = report["bytes_up"]
        assert "test_accuracy" in stdout
    assert sizes["fp16"] <= 0.55 * sizes["fp32"]
    assert sizes["int8"] <= 0.30 * sizes["fp32"]


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", wire.SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert wire.SERVICE_NAME in names and "grpc.health.v1.Health" in names


# Every bad input is covered in-process by test_validation.py; these two go to a real
# cloud-server process, to show its rejections arrive over the wire and it serves on.
@pytest.mark.parametrize("make,code,text", [
    (lambda sid: step("nope", 1), grpc.StatusCode.NOT_FOUND, "session_id"),
    (lambda sid: step(sid, 1, labels=[0, 1, 2, 10]), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
])
def test_bad_steps_rejected_and_server_keeps_serving(server, make, code, text):
    job = f"bad-{code.name}-{uuid.uuid4().hex[:6]}"
    with grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        session = stub.OpenSession(spec(job), timeout=10)
        error = rejected(lambda: list(stub.Train(iter([make(session.session_id)]), timeout=10)))
        assert error.code() == code and text in error.details()
        stats = stub.Stats(pb.StatsRequest(job=job), timeout=10)
        assert stats.jobs[0].steps_applied == 0  # the decoder was not touched
        good = list(stub.Train(iter([step(session.session_id, 1)]), timeout=10))
        assert good[0].step_id == 1 and not good[0].duplicate and len(good[0].grad.data) == 4 * 32 * 64 * 4


def test_bad_session_specs(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        for kw, text in [({"job": ""}, "job"), ({"feature_shape": [1, 2, 3]}, "feature_shape")]:
            fields = {"job": "x", "feature_shape": [32, 8, 8], **kw}
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenSession(pb.SessionSpec(client_id="c", arch="cnn", num_classes=10, input_shape=[1, 16, 16],
                                                lr=0.1, grad_codec="fp32", **fields), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
        stub.OpenSession(spec("fixed"), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(pb.SessionSpec(job="fixed", client_id="d", arch="cnn", cut="block2", num_classes=10,
                                            input_shape=[1, 16, 16], feature_shape=[64, 4, 4], lr=0.1,
                                            grad_codec="fp32"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cut" in err.value.details()


def test_retry_of_last_step_returns_cached_gradient(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        sid = stub.OpenSession(spec("dup"), timeout=10).session_id
        msg = step(sid, 1)
        first, again = list(stub.Train(iter([msg, msg]), timeout=10))
        assert not first.duplicate and again.duplicate and again.grad == first.grad
        assert stub.Stats(pb.StatsRequest(job="dup"), timeout=10).jobs[0].steps_applied == 1


def test_sessions_of_one_job_share_a_decoder_without_lost_updates(server):
    address = server.address

    def client(name: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            sid = stub.OpenSession(spec("shared", name), timeout=10).session_id
            assert len(list(stub.Train(iter(step(sid, i) for i in range(1, 21)), timeout=60))) == 20

    threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with grpc.insecure_channel(address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        stub.OpenSession(spec("other"), timeout=10)
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
    jobs = {j.job: j for j in stats.jobs}
    assert jobs["shared"].steps_applied == 60 and dict(jobs["shared"].client_last_step) == {"c0": 20, "c1": 20, "c2": 20}
    assert jobs["other"].steps_applied == 0 and jobs["other"].sessions_open == 1


@pytest.mark.slow
def test_oversize_message_names_the_flag(tmp_path):
    small = start_server("--max-message-mb", "0.4")
    try:
        config = edge_config(small.address, max_steps=2, job="big")  # block1 batch 64 fp32: 0.5 MiB
        with pytest.raises(Exception) as err:
            run(config, RemoteCloud(config.connection))
        assert "RESOURCE_EXHAUSTED" in str(err.value) and "cloud-server --max-message-mb" in str(err.value)
        mine = dataclasses.replace(config, connection=ConnectionConfig(small.address, max_message_mb=0.2))
        with pytest.raises(Exception) as err:
            run(mine, RemoteCloud(mine.connection))
        assert "edge-client --max-message-mb" in str(err.value)
    finally:
        small.stop()


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edge_client", "--dataset", "cifar10", "--data-root",
                           str(tmp_path / "missing"), "--server", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--data-root" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "edge_client", "--cut", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "valid" in done.stderr
