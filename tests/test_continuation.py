"""Continuing a trained split model: the encoder from its file, a new job's decoder from the trained
job's, in process and against a real cloud-server; models that differ are refused by name."""

import dataclasses
import subprocess
import sys
import uuid

import pytest
import torch

from cloud_server.local import LocalCloud
from deploy.processes import start_server
from edge_client.config import ConnectionConfig, DefenseConfig, EdgeConfig
from edge_client.remote import CloudError, RemoteCloud
from edge_client.trainer import EdgeTrainer, run
from splitnet import data, encoder_file

SPLITS = None


def digits():
    global SPLITS
    if SPLITS is None:
        SPLITS = data.load(data.DataSpec("digits"))
    return SPLITS


def config(noise: float = 0.0, **kw) -> EdgeConfig:
    kw.setdefault("epochs", 1)
    kw.setdefault("max_steps", 6)
    kw.setdefault("bottleneck", 4)
    return EdgeConfig(progress=False, defense=DefenseConfig(noise=noise), **kw)


def logits(trainer: EdgeTrainer) -> torch.Tensor:
    """The model's outputs on the test set through its cloud, without the defense's noise (the two
    runs compared may add different noise): the encoder's and the decoder's weights, nothing else."""
    x = torch.stack([x for x, _ in digits().test])
    trainer.encoder.eval()
    with torch.no_grad():
        return torch.cat(list(trainer.cloud.infer([trainer.encoder(x)], trainer.config.codec)))


def trained_base(cloud, tmp_path, **kw) -> tuple[EdgeConfig, torch.Tensor]:
    """A base run (job 'base'): its config and its model's test logits at the end."""
    base = config(job="base", save_encoder=str(tmp_path / "base.pt"), **kw)
    trainer = EdgeTrainer(base, cloud, digits())
    trainer.open()
    trainer.train_epoch()
    expected = logits(trainer)
    trainer.save_encoder(base.save_encoder)
    return base, expected


def test_a_continuation_starts_from_both_trained_halves_in_process(tmp_path):
    jobs: dict = {}
    base, expected = trained_base(LocalCloud(jobs=jobs), tmp_path, noise=0.1)
    # another seed and defense: the continuation's own weights would differ everywhere
    follow = config(job="phase-b", seed=3, init_from=base.save_encoder, init_job="base")
    trainer = EdgeTrainer(follow, LocalCloud(jobs=jobs), digits())
    trainer.open()
    assert torch.equal(logits(trainer), expected)
    before = {k: v.clone() for k, v in jobs["base"].decoder.state_dict().items()}
    trainer.train_epoch()  # it trains on from there, and the base job is left as it was
    assert not torch.equal(logits(trainer), expected)
    assert all(torch.equal(v, before[k]) for k, v in jobs["base"].decoder.state_dict().items())
    report = trainer.report(trainer.evaluate())
    assert report["init_from"] == base.save_encoder and report["init_job"] == "base"


@pytest.mark.parametrize("change,field", [({"width": 0.5}, "width"), ({"bottleneck": 2}, "bottleneck"),
                                          ({"cut": "block2"}, "cut")])
def test_an_encoder_file_of_another_model_is_refused_by_field(tmp_path, change, field):
    base, _ = trained_base(LocalCloud(), tmp_path)
    other = dataclasses.replace(config(job="x", init_from=base.save_encoder), **change)
    with pytest.raises(encoder_file.DoesNotFit, match=f"base.pt: its {field} is .*this run's is"):
        EdgeTrainer(other, LocalCloud(), digits())


def test_a_file_that_is_not_an_encoder_file_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(encoder_file.DoesNotFit, match="bad.pt: not an encoder file"):
        EdgeTrainer(config(init_from=str(bad)), LocalCloud(), digits())


def test_local_init_job_must_exist_and_fit(tmp_path):
    jobs: dict = {}
    trained_base(LocalCloud(jobs=jobs), tmp_path)
    with pytest.raises(ValueError, match="init_job: no job 'nope'"):
        EdgeTrainer(config(job="b", init_job="nope"), LocalCloud(jobs=jobs), digits()).open()
    with pytest.raises(ValueError, match="init_job: bottleneck: 2 differs from job 'base'"):
        EdgeTrainer(config(job="c", init_job="base", bottleneck=2), LocalCloud(jobs=jobs), digits()).open()


def remote(address: str, **kw) -> EdgeConfig:
    return dataclasses.replace(config(**kw), connection=ConnectionConfig(server=address, deadline_s=30,
                                                                         connect_s=10, reconnect_s=10))


@pytest.mark.slow
def test_a_continuation_through_a_real_server(server, tmp_path):
    """The decoder is copied on the server, from the job in memory; the base job keeps training alone."""
    name = f"base-{uuid.uuid4().hex[:6]}"
    base = remote(server.address, job=name, save_encoder=str(tmp_path / "base.pt"))
    trainer = EdgeTrainer(base, RemoteCloud(base.connection), digits())
    trainer.open()
    trainer.train_epoch()
    expected = logits(trainer)
    trainer.save_encoder(base.save_encoder)
    trainer.close()
    follow = remote(server.address, job=f"{name}-b", seed=5, init_from=base.save_encoder, init_job=name)
    cont = EdgeTrainer(follow, RemoteCloud(follow.connection), digits())
    cont.open()
    try:
        assert torch.equal(logits(cont), expected)
    finally:
        cont.close()
    with pytest.raises(CloudError, match="init_from_job: this server holds no job 'missing'"):
        run(remote(server.address, job=f"{name}-c", init_job="missing"), RemoteCloud(follow.connection))
    with pytest.raises(CloudError, match=f"init_from_job: bottleneck: 2 differs from job '{name}'"):
        run(remote(server.address, job=f"{name}-d", init_job=name, bottleneck=2), RemoteCloud(follow.connection))


@pytest.mark.slow
def test_the_decoder_comes_from_a_checkpoint_after_a_restart(tmp_path):
    """The base's server went away: a new server on the same --checkpoint-dir starts the new job
    from the checkpoint the base's Flush made durable."""
    ckpt = str(tmp_path / "ckpt")
    first = start_server("--checkpoint-dir", ckpt)
    try:
        base = remote(first.address, job="base", save_encoder=str(tmp_path / "base.pt"))
        trainer = EdgeTrainer(base, RemoteCloud(base.connection), digits())
        trainer.open()
        trainer.train_epoch()
        trainer.make_durable()
        expected = logits(trainer)
        trainer.save_encoder(base.save_encoder)
        trainer.close()
    finally:
        first.stop()
    second = start_server("--checkpoint-dir", ckpt)
    try:
        follow = remote(second.address, job="phase-b", init_from=base.save_encoder, init_job="base")
        cont = EdgeTrainer(follow, RemoteCloud(follow.connection), digits())
        cont.open()
        assert torch.equal(logits(cont), expected)
        cont.close()
    finally:
        second.stop()


@pytest.mark.parametrize("flags,message", [
    (["--init-from", "/nonexistent/enc.pt"], "--init-from /nonexistent/enc.pt: no such file"),
    (["--job", "same", "--init-job", "same"], "--init-job same names this run's own --job"),
])
def test_cli_refuses_a_bad_start(flags, message):
    done = subprocess.run([sys.executable, "-m", "edge_client", "--server", "127.0.0.1:1", *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
