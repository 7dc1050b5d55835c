"""Learning-rate schedules, the width multiplier and seeded augmentation: the pieces of the
training recipe that both ends (and the attack harness) must agree on."""

import dataclasses

import numpy as np

import pytest
import torch

from cloud_server.job import Job
from cloud_server.local import LocalCloud
from edge_client.cli import add_training_args, config_from_args
from edge_client.config import EdgeConfig
from edge_client.trainer import EdgeTrainer, run
from splitnet import data, models
from splitnet.cli_util import Parser
from splitnet.schedule import LrSchedule

from messages import rejected, spec


def _torch_rates(scheduler_cls, steps: int, per_epoch: int | None, **kw) -> list[float]:
    """The rate torch's scheduler gives each optimizer step, stepped per epoch or per step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = scheduler_cls(opt, **kw)
    rates = []
    for step in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        if per_epoch is None or (step + 1) % per_epoch == 0:
            sched.step()
    return rates


def test_multistep_equals_torch_multisteplr_stepped_per_epoch():
    s = LrSchedule.parse("multistep:2,5:0.2", epochs=8, steps_per_epoch=7)
    ours = [s.factor(k) for k in range(1, 8 * 7 + 1)]
    theirs = _torch_rates(torch.optim.lr_scheduler.MultiStepLR, 8 * 7, 7, milestones=[2, 5], gamma=0.2)
    assert ours == pytest.approx(theirs)
    assert len(set(round(v, 9) for v in ours)) == 3


def test_cosine_equals_torch_cosineannealinglr_stepped_per_step():
    s = LrSchedule.parse("cosine", epochs=4, steps_per_epoch=5)
    ours = [s.factor(k) for k in range(1, 21)]
    theirs = _torch_rates(torch.optim.lr_scheduler.CosineAnnealingLR, 20, None, T_max=20)
    assert ours == pytest.approx(theirs)


def test_warmup_ramps_linearly_then_follows_the_schedule():
    s = LrSchedule.parse("cosine", epochs=10, steps_per_epoch=4, warmup_epochs=1)
    assert [s.factor(k) for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = _torch_rates(torch.optim.lr_scheduler.CosineAnnealingLR, 36, None, T_max=36)
    assert [s.factor(k) for k in range(5, 41)] == pytest.approx(after)
    assert LrSchedule.parse("constant", epochs=3).factor(1000) == 1.0


@pytest.mark.parametrize("text, flag", [("multistep:5,2:0.2", "milestones"), ("multistep:2:1.5", "gamma"),
                                        ("cosine:3", "only multistep"), ("linear", "kind"),
                                        ("multistep:a:0.1", "multistep:E1")])
def test_bad_schedules_are_refused_naming_what_is_wrong(text, flag):
    with pytest.raises(ValueError, match=flag):
        LrSchedule.parse(text, epochs=10)


def test_the_cli_refuses_a_bad_schedule_or_width_naming_the_flag(capsys):
    p = Parser()
    add_training_args(p)
    for argv, flag in ((["--lr-schedule", "multistep:3:2"], "--lr-schedule gamma"),
                       (["--warmup-epochs", "20", "--epochs", "5"], "--warmup-epochs"),
                       (["--width", "0"], "--width")):
        with pytest.raises(SystemExit):
            config_from_args(p.parse_args(argv), p)
        assert flag in capsys.readouterr().err
    config = config_from_args(p.parse_args(["--lr-schedule", "multistep:1:0.5", "--width", "0.5"]), p)
    assert config.lr_schedule == "multistep:1:0.5" and config.width == 0.5


def test_decoder_steps_at_the_encoder_rate_every_step_in_process():
    """The in-process cloud runs the same Job: every step's decoder rate equals the encoder's,
    and the rate really drops at the milestone (not a constant on both sides)."""
    rates: list[tuple[int, float, float]] = []

    class Recording(LocalCloud):
        def collect(self, step_id):
            reply = super().collect(step_id)
            rates.append((step_id, reply.lr, self.job.optimizer.param_groups[0]["lr"]))
            return reply

    config = EdgeConfig(epochs=2, lr=0.04, lr_schedule="multistep:1:0.1", progress=False)
    report = run(config, Recording())
    per_epoch = report["lr_schedule"]["steps_per_epoch"]
    assert report["lr_mismatch_steps"] == 0
    assert [r[0] for r in rates] == list(range(1, 2 * per_epoch + 1))
    for step_id, reply_lr, decoder_lr in rates:
        expected = 0.04 if step_id <= per_epoch else 0.004
        assert reply_lr == pytest.approx(expected) and decoder_lr == pytest.approx(expected)
    assert [h["lr"] for h in report["history"]] == pytest.approx([0.04, 0.004])


def test_a_mismatched_decoder_rate_is_counted():
    class Constant(LocalCloud):  # a cloud that ignores the schedule: an old or misconfigured server
        def open(self, job, client_id, split, optim, grad_codec, seed, init_job=""):
            return super().open(job, client_id, split, dataclasses.replace(optim, schedule=LrSchedule()),
                                grad_codec, seed)

    report = run(EdgeConfig(epochs=1, max_steps=6, lr_schedule="cosine", progress=False), Constant())
    assert report["lr_mismatch_steps"] == 5  # the first step's rate is the base rate on both sides


def test_job_checkpoint_keeps_each_clients_schedule():
    split = models.SplitSpec("cnn", "block1", 10, (1, 16, 16))
    job = Job("j", split, models.OptimSpec(lr=0.1))
    job.set_schedule("a", LrSchedule.parse("multistep:1:0.5", epochs=3, steps_per_epoch=2))
    job.set_schedule("b", LrSchedule.parse("cosine", epochs=2, steps_per_epoch=4, warmup_epochs=1))
    restored = Job.from_state(job.state())
    x, y = torch.rand(4, 32, 8, 8), torch.tensor([0, 1, 2, 3])
    assert restored.train_step("a", 1, x, y).lr == pytest.approx(0.1)
    assert restored.train_step("a", 2, x, y).lr == pytest.approx(0.1)
    assert restored.train_step("a", 3, x, y).lr == pytest.approx(0.05)
    assert restored.train_step("b", 1, x, y).lr == pytest.approx(0.025)


def test_server_refuses_a_bad_schedule_and_a_width_mismatch(server):
    import grpc

    from splitnet.v1 import split_pb2 as pb
    from splitnet.v1 import split_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitLearningStub(channel)
        bad = pb.LrSchedule(kind="multistep", gamma=0.2, epochs=2, steps_per_epoch=10)
        err = rejected(lambda: stub.OpenSession(spec("sched-bad", lr_schedule=bad), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "lr_schedule.milestones" in err.details()
        bad.milestones.append(1)
        bad.gamma = 7.0
        err = rejected(lambda: stub.OpenSession(spec("sched-bad", lr_schedule=bad), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "lr_schedule.gamma" in err.details()
        good = pb.LrSchedule(kind="cosine", gamma=0.1, epochs=2, steps_per_epoch=10)
        assert stub.OpenSession(spec("sched-width", lr_schedule=good), timeout=5).session_id
        narrow = spec("sched-width", client="d", width=0.5, feature_shape=[16, 8, 8])
        err = rejected(lambda: stub.OpenSession(narrow, timeout=5))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "width" in err.details()


def test_width_scales_every_layer_and_keeps_the_cut():
    full = models.build(models.SplitSpec("vgg11_bn", "pool2", 10, (3, 32, 32), 8))
    quarter = models.build(models.SplitSpec("vgg11_bn", "pool2", 10, (3, 32, 32), 8, 0.25))
    assert full.feature_shape == quarter.feature_shape == (8, 8, 8)
    widths = [m.out_channels for m in quarter.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [16, 32, 8]  # conv1, conv2 at a quarter of 64, 128; the bottleneck stays 8
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ratio = count(quarter.decoder) / count(full.decoder)
    assert 0.04 < ratio < 0.1  # parameters scale with width squared
    assert models.build(models.SplitSpec("vgg11_bn", "conv1", 10, (3, 32, 32), 0, 0.25)).feature_shape == (16, 32, 32)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index():
    x = torch.rand(3, 32, 32)
    a = data.augment(x, seed=3, epoch=1, index=7)
    assert torch.equal(a, data.augment(x, seed=3, epoch=1, index=7))
    others = [data.augment(x, 3, e, i) for e, i in ((2, 7), (1, 8), (5, 7), (1, 9))]
    assert sum(not torch.equal(a, o) for o in others) >= 3
    # a crop of the zero-padded image: the content is shifted, never rescaled
    shifted = [data.augment(torch.ones(3, 32, 32), 0, 1, i) for i in range(400)]
    assert all(set(s.unique().tolist()) <= {0.0, 1.0} for s in shifted)
    assert any(bool((s == 0).any()) for s in shifted) and any(bool((s == 1).all()) for s in shifted)
    ramp = torch.arange(1.0, 33.0).expand(1, 32, 32)  # rising left to right: a flip makes it fall
    flips = sum(float(o[0, 16, 16] - o[0, 16, 15]) < 0 for o in (data.augment(ramp, 0, 1, i) for i in range(200)))
    assert 70 < flips < 130


def test_augment_defaults_on_for_rgb_only_and_the_harness_replays_the_pixels_sent():
    from attacks.harness import PrivateSession

    rgb = data.Splits(data._Uint8Images(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8),
                                        torch.arange(40) % 2),
                      data._Uint8Images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)),
                      2, (3, 8, 8))
    trainer = EdgeTrainer(EdgeConfig(epochs=2, batch_size=8, progress=False), LocalCloud(), rgb)
    assert trainer.augment and not EdgeTrainer(EdgeConfig(progress=False), LocalCloud()).augment
    sent = []
    for epoch in (1, 2):
        trainer.augmented.epoch = epoch
        sent += [x for x, _ in trainer.loader]
    report = {"session_id": "s", "eval_batch_size": 16, "first_step_id": 0, "train_set_size": 40,
              "batch_size": 8, "seed": 0, "steps": 10, "augment": True}
    session = PrivateSession(report, rgb)
    assert all(torch.equal(session.truth("Train", k + 1), sent[k]) for k in range(10))
    plain = PrivateSession({**report, "augment": False}, rgb)
    assert not torch.equal(plain.truth("Train", 7), sent[6])


def test_in_memory_image_tree_serves_the_same_pixels(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                g = torch.Generator().manual_seed(i)
                pixels = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8, generator=g)
                Image.fromarray(pixels.numpy()).save(tmp_path / split / label / f"{i}.png")
    splits = data.load(data.DataSpec("imagefolder", str(tmp_path), image_size=12))
    assert isinstance(splits.train, data._Uint8Images) and splits.input_shape == (3, 12, 12)
    x, y = splits.train[4]
    expected = torch.from_numpy(np.array(Image.open(tmp_path / "train" / "b" / "1.png"))).permute(2, 0, 1)
    assert y == 1 and torch.equal(x, expected.float() / 255.0)


def test_paper_schedule_scales_the_cem_milestones_to_the_run():
    s = LrSchedule.parse("paper", epochs=240, steps_per_epoch=3)
    assert s.kind == "multistep" and s.milestones == (60, 120, 180, 210) and s.gamma == 0.2
    assert 0.05 * s.factor(180 * 3 + 1) < 4.1e-4 < 0.05 * s.factor(180 * 3)  # w_lr = 1 from epoch 180 on
    assert LrSchedule.parse("paper", epochs=8).milestones == (2, 4, 6, 7)
    with pytest.raises(ValueError, match="epochs >= 8"):
        LrSchedule.parse("paper", epochs=5)
