"""`edge-client --infer-only`: a trained encoder and the cloud's decoder of its job answer images one
request at a time, through a real `cloud-server`; each answer comes with its latency. The requests of
a session share one held Infer stream."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from deploy.processes import start_server
from edge_client import cli, infer
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import CloudError, HeldStream, RemoteCloud, open_channel
from edge_client.trainer import run
from messages import wait_until
from splitnet.models import OptimSpec, SplitSpec, build


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """An encoder trained a few steps against the server, job "infer-test"."""
    path = tmp_path_factory.mktemp("enc") / "enc.pt"
    config = EdgeConfig(connection=ConnectionConfig(server=server.address), epochs=1, max_steps=12, bottleneck=8,
                        job="infer-test", save_encoder=str(path), progress=False)
    run(config, RemoteCloud(config.connection))
    return path


def _png_folder(root: Path, count: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        folder = root / ("odd" if i % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
    (root / "notes.txt").write_text("not an image")


@pytest.mark.slow
def test_a_folder_of_images_gets_a_prediction_and_a_latency_each(server, trained, tmp_path):
    _png_folder(tmp_path / "images", 6)
    done = subprocess.run([sys.executable, "-m", "edge_client", "--infer-only", "--encoder", str(trained), "--images",
                           str(tmp_path / "images"), "--server", server.address, "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["job"] == "infer-test"  # the encoder file's job: the decoder it trained with
    assert [p["image"] for p in report["predictions"]] == [f"{d}/{i}.png" for d, i in (
        ("even", 0), ("even", 2), ("even", 4), ("odd", 1), ("odd", 3), ("odd", 5))]
    assert all(0 <= p["class"] < 10 and 0 < p["confidence"] <= 1 and p["latency_ms"] > 0
               for p in report["predictions"])
    assert (report["requests"], report["images"], report["accuracy"]) == (6, 6, None)
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p99"] and report["requests_per_second"] > 0
    assert report["bytes_up"] > 6 * 512 * 4  # six requests of 8x8x8 fp32 features, at least
    assert "6 images in 6 requests of 1: latency p50" in done.stdout


def test_the_test_split_in_small_batches_adds_an_accuracy(server, trained):
    config = EdgeConfig(connection=ConnectionConfig(server=server.address))
    report = infer.run(config, infer.InferConfig(str(trained), max_images=20, batch_size=8),
                       RemoteCloud(config.connection))
    assert (report["images"], report["requests"], report["batch_size"]) == (20, 3, 8)
    assert report["accuracy"] == sum(p["class"] == p["label"] for p in report["predictions"]) / 20
    # a batch's images share its request's latency
    assert report["predictions"][0]["latency_ms"] == report["predictions"][7]["latency_ms"]


def test_a_job_without_a_trained_decoder_is_refused_naming_the_encoders_job(server, trained):
    config = EdgeConfig(connection=ConnectionConfig(server=server.address), job="never-trained")
    with pytest.raises(CloudError, match="has applied no training step.*the file names 'infer-test'"):
        infer.run(config, infer.InferConfig(str(trained), max_images=2), RemoteCloud(config.connection))


@pytest.mark.parametrize("argv, needle", [
    (["--infer-only"], "--infer-only needs --encoder PATH"),
    (["--infer-only", "--encoder", "missing.pt"], "--encoder missing.pt: no such file"),
    (["--infer-only", "--encoder", __file__, "--images", "nowhere"], "--images nowhere: not a folder"),
    (["--infer-only", "--encoder", __file__, "--infer-batch-size", "0"], "--infer-batch-size must be >= 1"),
])
def test_bad_inference_flags_are_errors_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


class _CountCalls(grpc.StreamStreamClientInterceptor):
    """Counts the streams a channel opens, by method: how the tests see that calls share one."""

    def __init__(self) -> None:
        self.opened: dict[str, int] = {}

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        method = client_call_details.method.rsplit("/", 1)[-1]
        self.opened[method] = self.opened.get(method, 0) + 1
        return continuation(client_call_details, request_iterator)


def _counted(config: ConnectionConfig) -> tuple[RemoteCloud, _CountCalls]:
    counter = _CountCalls()
    return RemoteCloud(config, grpc.intercept_channel(open_channel(config), counter)), counter


def _open(cloud: RemoteCloud, job: str) -> None:
    cloud.open(job, f"c-{uuid.uuid4().hex[:6]}", build(SplitSpec(cut="block1")), OptimSpec(), "fp32", 0)


_TOKEN = "held-stream-test-token"


@pytest.fixture(scope="module")
def strict_server():
    """A cloud-server that ends a stream idle for 3 s and lets a peer hold one stream, with a token."""
    proc = start_server("--idle-timeout", "3", "--max-streams-per-peer", "1", "--auth-token", _TOKEN)
    yield proc
    proc.stop()


def test_single_image_calls_from_several_threads_share_one_held_stream(server):
    """Each caller gets its own image's logits (as one batch of them all answers), the bytes are counted per
    request, and only one Infer stream is opened: the others would each pay a stream's set-up."""
    cloud, counter = _counted(ConnectionConfig(server=server.address))
    _open(cloud, "held-infer")
    images = torch.rand(24, 32, 8, 8)
    try:
        (expected,) = cloud.infer([images], "fp32")
        up, down = cloud.bytes_up, cloud.bytes_down
        answers: dict[int, torch.Tensor] = {}

        def ask(first: int) -> None:
            for i in range(first, len(images), 3):
                (answers[i],) = cloud.infer([images[i:i + 1]], "fp32")

        threads = [threading.Thread(target=ask, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(answers) == list(range(24))
        assert torch.allclose(torch.cat([answers[i] for i in range(24)]), expected, atol=1e-5)
        assert counter.opened == {"Infer": 1}
        assert cloud.bytes_up - up > 24 * 32 * 8 * 8 * 4 and cloud.bytes_down - down > 24 * 10 * 4
    finally:
        cloud.close()


def test_a_refusal_on_the_held_stream_reads_as_on_a_new_one_and_the_next_call_goes_on(server):
    config = ConnectionConfig(server=server.address)
    fresh = RemoteCloud(config)
    _open(fresh, "held-infer")
    with pytest.raises(CloudError) as on_new:
        list(fresh.infer([torch.rand(1, 16, 8, 8)], "fp32"))  # the job's features have 32 channels
    fresh.close()
    cloud, counter = _counted(config)
    _open(cloud, "held-infer")
    try:
        list(cloud.infer([torch.rand(1, 32, 8, 8)], "fp32"))
        with pytest.raises(CloudError) as on_held:
            list(cloud.infer([torch.rand(1, 16, 8, 8)], "fp32"))
        assert on_held.value.code == on_new.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(on_held.value) == str(on_new.value).replace(fresh.session_id, cloud.session_id)
        assert len(list(cloud.infer([torch.rand(2, 32, 8, 8)], "fp32"))) == 1  # on a new stream: the refusal ended it
        assert counter.opened == {"Infer": 2}
    finally:
        cloud.close()


def test_a_stream_the_server_ended_while_idle_is_replaced_unseen(strict_server):
    cloud, counter = _counted(ConnectionConfig(server=strict_server.address, auth_token=_TOKEN))
    _open(cloud, "held-idle")
    try:
        list(cloud.infer([torch.rand(1, 32, 8, 8)], "fp32"))
        time.sleep(4)  # past the server's --idle-timeout 3
        (logits,) = cloud.infer([torch.rand(1, 32, 8, 8)], "fp32")
        assert logits.shape == (1, 10) and counter.opened == {"Infer": 2}
    finally:
        cloud.close()


def test_closing_the_session_gives_the_stream_back(strict_server):
    """Over a channel that outlives the session (a Ray worker's): the server lets this peer hold one
    stream, so the next session's Infer is refused unless the first session's stream was closed."""
    config = ConnectionConfig(server=strict_server.address, auth_token=_TOKEN)
    channel = open_channel(config)
    try:
        first = RemoteCloud(config, channel)
        _open(first, "held-close")
        list(first.infer([torch.rand(1, 32, 8, 8)], "fp32"))
        first.close()
        second = RemoteCloud(config, channel)
        _open(second, "held-close")
        deadline = time.monotonic() + 1.5  # the server frees the slot once it sees the cancel (well inside
        while True:                        # the 3 s after which an idle stream it kept would be ended)
            try:
                (logits,) = second.infer([torch.rand(1, 32, 8, 8)], "fp32")
                break
            except CloudError as err:
                if err.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert logits.shape == (1, 10)
        second.close()
    finally:
        channel.close()


class _AnsweredByTheTest:
    """A held call whose replies the test puts in `replies`; `cancel` ends a wait as gRPC does."""

    def __init__(self, requests) -> None:
        self.replies: queue.Queue = queue.Queue()

    def __next__(self):
        reply = self.replies.get()
        if reply is None:
            raise _Cancelled()
        return reply

    def cancel(self) -> None:
        self.replies.put(None)


class _Cancelled(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED


def test_the_reply_watchdog_wakes_once_for_a_run_of_timely_replies_and_still_cancels_a_late_one():
    """A watchdog woken per reply took the GIL in the middle of every step: only a deadline earlier than
    the one it sleeps until wakes it."""
    calls: list[_AnsweredByTheTest] = []
    stream = HeldStream(lambda requests: calls.append(_AnsweredByTheTest(requests)) or calls[-1])
    woken = []
    notify = stream._watch.notify
    stream._watch.notify = lambda *a: (woken.append(1), notify(*a))
    try:
        calls[0].replies.put(0)
        assert stream.receive(60.0) == 0
        assert wait_until(lambda: stream._wakes_at is not None)  # the watchdog took that deadline and sleeps
        for i in range(1, 50):
            calls[0].replies.put(i)
            assert stream.receive(60.0) == i
        assert len(woken) == 1  # the first reply's: the watchdog slept without a deadline until then
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # a shorter deadline than the one it sleeps until
            stream.receive(0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5.0  # not the 60 s it slept until
    finally:
        stream.close()

