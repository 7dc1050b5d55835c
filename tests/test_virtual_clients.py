"""Virtual clients without Ray: a trainer carried between turns as a `TrainerState`, and the
server's cost of the client ids such runs leave behind (tests/test_ray_virtual.py runs them on Ray)."""

import pytest
import torch
from torch.utils.data import Subset

from cloud_server.job import Job
from cloud_server.local import LocalCloud
from deploy.sim import cli as ray_cli
from deploy.sim.config import Kill, RayRunConfig, VirtualClients
from edge_client.config import DefenseConfig, EdgeConfig
from edge_client.trainer import EdgeTrainer, StepsLost
from splitnet import data
from splitnet.checkpoint_file import encode
from splitnet.models import OptimSpec, SplitSpec
from splitnet.schedule import LrSchedule

SPLITS = data.load(data.DataSpec())
# 40 samples in batches of 16 are 3 batches a pass; turns of 2 steps end within passes and cross them.
SHARD = Subset(SPLITS.train, range(40))
CONFIG = EdgeConfig(epochs=3, epoch_steps=2, batch_size=16, defense=DefenseConfig(noise=0.1), job="turns",
                    client_id="c", progress=False)


def _trainer(cloud: LocalCloud) -> EdgeTrainer:
    return EdgeTrainer(CONFIG, cloud, SPLITS, SHARD)


def test_a_client_restored_between_turns_trains_as_one_that_never_stopped():
    """Data position, shuffling, noise, encoder and momentum all come back: bit for bit the same run."""
    whole_cloud, turns_cloud = LocalCloud(), LocalCloud()
    whole = _trainer(whole_cloud)
    whole.open(own_count=True)
    state = None
    for _ in range(CONFIG.epochs):
        whole.train_epoch()
        turn = _trainer(turns_cloud)  # a fresh trainer each turn, as a Ray worker builds one
        if state is not None:
            turn.restore(state)
        turn.open(own_count=True)
        turn.train_epoch()
        state = turn.snapshot(encoder=True)
    assert (state.steps, state.passes, state.pass_offset) == (6, 2, 3)  # 2 + 2 + 2 steps over 3-batch passes
    assert [h["train_loss"] for h in state.history] == [h["train_loss"] for h in whole.history]
    final = whole.snapshot(encoder=True)
    assert all(torch.equal(final.encoder[k], state.encoder[k]) for k in final.encoder)
    assert all(torch.equal(a, b) for a, b in zip(whole_cloud.job.decoder.state_dict().values(),
                                                  turns_cloud.job.decoder.state_dict().values()))
    assert (state.samples, state.cloud["bytes_up"]) == (final.samples, final.cloud["bytes_up"])
    assert torch.equal(state.noise_rng, final.noise_rng) and torch.equal(state.loader_rng, final.loader_rng)


def test_a_turn_run_again_resends_its_steps_and_none_is_applied_twice():
    cloud = LocalCloud()
    first = _trainer(cloud)
    first.open(own_count=True)
    first.train_epoch()
    before = first.snapshot(encoder=True)
    dead = _trainer(cloud)  # runs the second turn, then "dies" before its state is written back
    dead.restore(before)
    dead.open(own_count=True)
    dead.train_epoch()
    again = _trainer(cloud)
    again.restore(before)
    again.open(own_count=True)
    again.train_epoch()
    # the same step ids again, answered as duplicates: the job applied each of the 4 steps once
    assert (again.step_id, again.steps, again.duplicates, again.resent) == (4, 4, 2, 2)
    assert cloud.job.steps_applied == cloud.job.last_step("c") == 4


def test_a_server_behind_the_clients_count_is_an_error_not_a_silent_renumbering():
    trainer = _trainer(LocalCloud())
    trainer.open(own_count=True)
    trainer.train_epoch()
    state = trainer.snapshot(encoder=False)
    later = _trainer(LocalCloud())  # a cloud that lost the job
    later.restore(state)
    with pytest.raises(StepsLost, match="up to 0, but it sent 2"):
        later.open(own_count=True)


def test_a_thousand_idle_clients_cost_their_counters_and_no_gradient():
    """What exactly-once needs of a client that closed its session: its last step id, owner and
    schedule. Its kept reply (a batch's gradient) goes with the close's acknowledgement."""
    job = Job("many", SplitSpec("cnn", "block2", 10, (1, 8, 8)), OptimSpec(0.05))
    empty = len(encode(job.state()))
    features, labels = torch.rand(2, *job.feature_shape), torch.tensor([1, 2])
    clients = [f"ray-0a1b2c-{i}" for i in range(1000)]
    for client in clients:
        job.owners[client] = ""
        job.set_schedule(client, LrSchedule.parse("cosine", 3, 1))
        job.train_step(client, 1, features.clone(), labels, received=0)
    kept = sum(o.grad.nbytes for s in job.clients.values() for o in s.replies.values())
    assert kept == 1000 * features.nbytes  # unacknowledged: one gradient each, in memory and checkpoint
    for client in clients:
        job.forget_replies(client, 1)
    assert not any(s.replies for s in job.clients.values())
    assert job.last_step(clients[-1]) == 1  # the counter stays: a re-sent step 1 is still a duplicate
    per_client = (len(encode(job.state())) - empty) / len(clients)
    assert per_client < 512, per_client  # measured 323 bytes: id, last step, owner, schedule


def test_each_round_is_a_seeded_sample_of_distinct_clients():
    virtual = VirtualClients(fraction=0.1, min_clients=3)
    rounds = virtual.participants(1000, 5, seed=7)
    assert rounds == virtual.participants(1000, 5, seed=7) != virtual.participants(1000, 5, seed=8)
    assert all(len(r) == len(set(r)) == 100 and all(0 <= i < 1000 for i in r) for r in rounds)
    assert len({tuple(sorted(r)) for r in rounds}) == 5  # drawn afresh every round
    assert virtual.per_round(20) == 3 and virtual.per_round(2) == 2  # at least K, at most all
    assert VirtualClients(fraction=0.29).per_round(100) == 29  # 0.29 * 100 is 28.999... in floats


def test_a_kill_must_hit_a_client_that_takes_part():
    edge = EdgeConfig(epochs=2)
    virtual = VirtualClients(fraction=0.5)
    absent = next(i for i in range(4) if i not in virtual.participants(4, 2, 0)[1])
    with pytest.raises(ValueError, match=f"client {absent} takes no part in round 2"):
        RayRunConfig(edge, clients=4, virtual=virtual, kill=Kill(absent, 2))


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        ray_cli.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,needle", [
    (["--fraction", "0.5"], "--fraction is for virtual clients: add --workers"),
    (["--local-steps", "3"], "--local-steps is for virtual clients"),
    (["--workers", "--fraction", "0"], "--fraction must lie in (0, 1], got 0.0"),
    (["--workers", "2", "--fraction", "1.5"], "--fraction must lie in (0, 1]"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--workers", "--min-clients", "9", "--clients", "3"], "--min-clients 9 is more than the 3 --clients"),
    (["--workers", "--min-clients", "0"], "--min-clients must be >= 1"),
    (["--workers", "--local-steps", "-2"], "--local-steps must be >= 0"),
    (["--workers", "--cem", "gmm", "--lambda", "4"], "--cem with --workers"),
])
def test_virtual_client_flag_errors_name_the_flag(argv, needle, capsys):
    line = _error(argv, capsys)
    assert line.startswith("split-ray: error: ") and needle in line, line
