"""Checkpoints carry a format version and a sha256 of their payload; a file that cannot be
resumed (damaged, truncated, empty, foreign, wrong shapes, NaN / Inf, numbers out of range,
or a second file for one job) stops the server with the file's name and the reason, or is
skipped with --skip-bad-checkpoints."""

import shutil

import grpc
import pytest
import torch

from cloud_server import cli as cloud_cli
from cloud_server.checkpoints import Checkpointer
from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from cloud_server.servicer import SplitLearningServicer
from cloud_server.job import MAX_KEPT_REPLIES, Job
from deploy.processes import start_server
from splitnet import checkpoint_file
from splitnet.checkpoint_file import CheckpointError
from splitnet.models import OptimSpec, SplitSpec
from splitnet.schedule import LrSchedule
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from messages import spec, step

SPEC = SplitSpec("cnn", "block1", 10, (1, 16, 16))


def _trained(name: str) -> Job:
    job = Job(name, SPEC, OptimSpec(0.05, 0.9))
    job.train_step("c", 1, torch.rand(4, 32, 8, 8), torch.tensor([0, 1, 2, 3]))  # optimizer state exists
    return job


@pytest.fixture
def folder(tmp_path):
    """A checkpoint folder holding jobs 'good' and 'victim'; returns (folder, victim's file)."""
    saver = Checkpointer(str(tmp_path), 1)
    for name in ("good", "victim"):
        saver.save(_trained(name))
    return tmp_path, saver.path("victim")


def _flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def _rewrite(path, change) -> None:
    """Load the state, change it, write it back as a well-formed file (valid checksum)."""
    state = checkpoint_file.read(path)
    change(state)
    path.write_bytes(checkpoint_file.encode(state))


def _poison(state) -> None:
    state["decoder"]["0.0.weight"][0, 0, 0, 0] = float("nan")


def _inf_momentum(state) -> None:
    next(iter(state["optimizer"]["state"].values()))["momentum_buffer"].fill_(float("inf"))


def _reshape(state) -> None:
    state["decoder"]["0.0.weight"] = torch.zeros(64, 16, 3, 3)


def _nan_kept_gradient(state) -> None:
    state["client_replies"]["c"][0]["grad"].fill_(float("nan"))


def _kept_gradient_reshaped(state) -> None:
    state["client_replies"]["c"][0]["grad"] = torch.zeros(4, 16, 8, 8)


def _kept_reply_ahead(state) -> None:
    state["client_replies"]["c"][0]["step"] = 2  # the client's last step is 1


def _set(*keys, value):
    """A change that sets state[keys[0]][keys[1]]... to `value`: a well-typed number out of range."""
    def change(state) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _schedule(**fields):
    def change(state) -> None:
        state["client_schedule"] = {"c": {**LrSchedule().as_dict(), **fields}}
    return change


# numbers of the right type but out of range: each refused by field, before a job is built
OUT_OF_RANGE = [
    ("negative steps_applied", _set("steps_applied", value=-5), "'steps_applied': -5"),
    ("negative client step id", _set("client_last_step", "c", value=-1), "'client_last_step' of client 'c': -1"),
    ("negative seed", _set("seed", value=-1), "'seed': -1"),
    ("negative lr", _set("optim", "lr", value=-0.05), "'optim': lr: -0.05 must be finite and > 0"),
    ("zero lr", _set("optim", "lr", value=0.0), "'optim': lr: 0.0"),
    ("negative momentum", _set("optim", "momentum", value=-0.9), "'optim': momentum: -0.9"),
    ("negative weight decay", _set("optim", "weight_decay", value=-1e-4), "'optim': weight_decay: -0.0001"),
    ("zero schedule epochs", _schedule(epochs=0), "'client_schedule' of client 'c': lr_schedule.epochs: 0"),
    ("zero steps per epoch", _schedule(steps_per_epoch=0), "lr_schedule.steps_per_epoch: 0"),
    ("one class", _set("spec", "num_classes", value=1), "'spec': num_classes: 1"),
    ("huge input", _set("spec", "input_shape", value=[3, 4096, 4096]), "'spec': input_shape: [3, 4096, 4096]"),
    ("negative kept correct count", lambda state: state["client_replies"]["c"][0].update(correct=-3),
     "'client_replies' of client 'c', entry 0"),
]

DAMAGE = [
    ("empty", lambda p: p.write_bytes(b""), "empty"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-500]), "checksum mismatch"),
    ("one bit flipped", lambda p: _flip(p, -100), "checksum mismatch"),
    ("no header", lambda p: torch.save(checkpoint_file.read(p), p), "no 'splitnet-checkpoint' header"),
    ("future format", lambda p: p.write_bytes(p.read_bytes().replace(b"checkpoint 1 ", b"checkpoint 9 ", 1)),
     "format version 9"),
    ("foreign structure", lambda p: p.write_bytes(checkpoint_file.encode({"weights": torch.zeros(3)})), "'name'"),
    ("not a dict", lambda p: p.write_bytes(checkpoint_file.encode([1, 2, 3])), "not a job's state"),
    ("wrong shape", lambda p: _rewrite(p, _reshape), "does not fit the model"),
    ("NaN weight", lambda p: _rewrite(p, _poison), "decoder.0.0.weight holds NaN or Inf"),
    ("Inf optimizer state", lambda p: _rewrite(p, _inf_momentum), "momentum_buffer holds NaN or Inf"),
    ("NaN kept gradient", lambda p: _rewrite(p, _nan_kept_gradient), "client_replies.c.0.grad holds NaN or Inf"),
    ("kept reply ahead", lambda p: _rewrite(p, _kept_reply_ahead), "after the last step 1"),
    ("kept gradient reshaped", lambda p: _rewrite(p, _kept_gradient_reshaped), "shape [batch, 32, 8, 8]"),
    *[(name, lambda p, change=change: _rewrite(p, change), reason) for name, change, reason in OUT_OF_RANGE],
]


def _checked(directory, skip_bad: bool = False) -> Checkpointer:
    checkpointer = Checkpointer(str(directory), 1, skip_bad)
    checkpointer.check_all("cpu")
    return checkpointer


def test_a_checkpoint_round_trips(folder):
    directory, path = folder
    assert path.read_bytes().startswith(b"splitnet-checkpoint 1 sha256=")
    checkpointer = _checked(directory)
    assert sorted(checkpointer.on_disk) == ["good", "victim"] and checkpointer.load("victim", "cpu").last_step("c") == 1


@pytest.mark.parametrize("damage,reason", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_bad_checkpoint_is_refused_by_name_or_skipped(folder, damage, reason):
    directory, path = folder
    damage(path)
    with pytest.raises(CheckpointError) as err:
        _checked(directory)
    assert str(path) in str(err.value) and reason in str(err.value), str(err.value)
    assert sorted(_checked(directory, skip_bad=True).on_disk) == ["good"]


def test_unacknowledged_replies_survive_a_checkpoint_and_stay_bounded(tmp_path):
    """A step re-sent after a restart gets back the gradient the decoder computed for it before
    the crash, unless the client acknowledged receiving it; a client that acknowledges nothing
    (an older edge) has only its last MAX_KEPT_REPLIES kept."""
    def features():
        return torch.rand(4, 32, 8, 8)

    labels = torch.tensor([0, 1, 2, 3])
    job = Job("kept", SPEC, OptimSpec(0.05, 0.9))
    grads = {s: job.train_step("c", s, features(), labels, received=max(0, s - 3)).grad for s in range(1, 6)}
    Checkpointer(str(tmp_path), 1).save(job)
    restored = _checked(tmp_path).load("kept", "cpu")
    for s in (3, 4, 5):  # pipelined two ahead: replies 3..5 not yet acknowledged
        again = restored.train_step("c", s, features(), labels, received=2)
        assert again.duplicate and torch.equal(again.grad, grads[s]) and again.lr == pytest.approx(0.05)
    assert restored.train_step("c", 2, features(), labels, received=2).grad is None
    assert restored.steps_applied == 5

    for s in range(6, MAX_KEPT_REPLIES + 10):
        restored.train_step("c", s, features(), labels)
    last = MAX_KEPT_REPLIES + 9
    assert restored.train_step("c", last - MAX_KEPT_REPLIES, features(), labels).grad is None
    assert restored.train_step("c", last - MAX_KEPT_REPLIES + 1, features(), labels).grad is not None


def test_two_files_for_one_job_are_refused_with_both_names(folder):
    directory, path = folder
    copy = directory / "renamed.ckpt"
    shutil.copy(path, copy)
    with pytest.raises(CheckpointError) as err:
        _checked(directory)
    assert str(path) in str(err.value) and str(copy) in str(err.value) and "'victim'" in str(err.value)
    assert sorted(_checked(directory, skip_bad=True).on_disk) == ["good"]


@pytest.mark.slow
def test_the_cli_exits_naming_the_file_or_skips_it(folder, capsys):
    directory, path = folder
    path.write_bytes(path.read_bytes()[:1000])
    assert cloud_cli.main(["--port", "0", "--checkpoint-dir", str(directory)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "checksum mismatch" in err[0] and "Traceback" not in err[0]

    server = start_server("--checkpoint-dir", str(directory), "--skip-bad-checkpoints")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stats = split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(), timeout=10)
        assert [j.job for j in stats.jobs] == ["good"]
    finally:
        server.stop()
    assert path.name in server.output() and "--skip-bad-checkpoints" in server.output()


def test_a_job_that_never_trained_leaves_no_checkpoint(tmp_path):
    """Opening jobs costs a peer nothing on disk: only a job that applied a step is written."""
    server = CloudServer(ServerConfig(port=0, grace_seconds=0.5, checkpoint_dir=str(tmp_path)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.start()}") as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            for job in ("opened-only", "another-opened-only"):
                stub.OpenSession(spec(job), timeout=10)
            sid = stub.OpenSession(spec("trained"), timeout=10).session_id
            list(stub.Train(iter([step(sid, 1)]), timeout=10))
    finally:
        server.stop()  # checkpoints every job that trained
    assert [p.name for p in tmp_path.glob("*.ckpt")] == [Checkpointer(str(tmp_path), 1).path("trained").name]


@pytest.mark.slow
def test_a_negative_step_count_stops_the_server_or_is_skipped_and_stats_answers(folder):
    """The issue's file: a valid header and checksum, steps_applied -5. It was resumed ("at step
    -5"); Stats then failed with UNKNOWN for every job, and the job's OpenSession with
    INVALID_ARGUMENT. Now it stops the server naming the file and the field; with the flag the
    server starts without it, Stats answers for the other job, and the job starts afresh."""
    directory, path = folder
    _rewrite(path, _set("steps_applied", value=-5))
    with pytest.raises(RuntimeError) as err:  # the server exits before it listens
        start_server("--checkpoint-dir", str(directory))
    assert str(path) in str(err.value) and "'steps_applied': -5" in str(err.value), str(err.value)

    server = start_server("--checkpoint-dir", str(directory), "--skip-bad-checkpoints")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = split_pb2_grpc.SplitLearningStub(channel)
            before = stub.Stats(pb.StatsRequest(), timeout=10)
            session = stub.OpenSession(spec("victim"), timeout=10)
            after = stub.Stats(pb.StatsRequest(), timeout=10)
    finally:
        server.stop()
    assert [j.job for j in before.jobs] == ["good"] and before.jobs[0].steps_applied == 1
    assert not session.resumed and session.job_steps_applied == 0
    assert sorted(j.job for j in after.jobs) == ["good", "victim"]
    assert "'steps_applied': -5" in server.output() and "--skip-bad-checkpoints" in server.output()


def test_stats_leaves_out_a_job_whose_numbers_do_not_fit_and_answers_for_the_rest(tmp_path, caplog):
    """Stats' fields are unsigned: a number that does not fit one costs that job its line, not
    every caller's Stats (gRPC would answer UNKNOWN for an exception escaping the handler)."""
    servicer = SplitLearningServicer(Checkpointer(str(tmp_path), 1))
    servicer.checkpointer.on_disk.update(good={"steps_applied": 3, "client_last_step": {"c": 3}},
                                         broken={"steps_applied": -5, "client_last_step": {"c": -5}})
    reply = servicer.Stats(pb.StatsRequest(), context=None)
    assert [(j.job, j.steps_applied) for j in reply.jobs] == [("good", 3)]
    assert "'broken' left out" in caplog.text
