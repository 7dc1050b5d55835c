"""The control for `split-ray --workers`' accuracy: the same clients, samples and schedules, in one process.

Trains N clients the way `deploy.sim.virtual` does (the seeded sample of each round,
a turn of a local epoch or `--local-steps`, each client's schedule spanning its turns,
every client starting from client 0's initial encoder), but as N `EdgeTrainer`s that
stay alive in this process against one in-process job (`LocalCloud`): no Ray, no
workers, no states carried between turns, no gRPC. Only `--mode parallel` (every client
its own encoder, measuring its batch-norm statistics before evaluating, as a virtual
one does): where split-ray's accuracy differs from this, the difference is the engine's;
where both fall short of a few clients of their own, it is the mode's. Prints one JSON
object: the mean and lowest test accuracy over the clients.

    python benchmarks/virtual_control.py --clients 100 --fraction 0.2 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from torch.utils.data import Subset

from cloud_server.local import LocalCloud
from deploy.sim import partition
from deploy.sim.config import PartitionSpec, VirtualClients
from edge_client.config import EdgeConfig
from edge_client.trainer import EdgeTrainer
from splitnet import data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--local-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=EdgeConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    splits = data.load(data.DataSpec())
    shards = partition.split(partition.labels_of(splits.train), args.clients, PartitionSpec(), args.seed)
    rounds = VirtualClients(fraction=args.fraction).participants(args.clients, args.rounds, args.seed)
    trainers: list[EdgeTrainer] = []
    for i, shard in enumerate(shards):
        turns = sum(i in taking_part for taking_part in rounds)
        config = EdgeConfig(epochs=max(1, turns), epoch_steps=args.local_steps, lr=args.lr, seed=args.seed + i,
                            client_id=f"client-{i}", job="control", progress=False)
        trainer = EdgeTrainer(config, LocalCloud(trainers[0].cloud.job if trainers else None), splits,
                              Subset(splits.train, shard))
        if trainers:
            trainer.load_encoder_state(trainers[0].encoder_state())
        trainer.open(own_count=True)  # client 0 first: its seed makes the job's decoder
        trainers.append(trainer)
    for taking_part in rounds:
        for i in taking_part:
            trainers[i].train_epoch()
    accuracies = []
    for trainer in trainers:
        trainer.recalibrate_batch_norm()
        accuracies.append(trainer.evaluate())
    print(json.dumps({**vars(args), "mode": "parallel", "test_accuracy": sum(accuracies) / len(accuracies),
                      "lowest_test_accuracy": min(accuracies),
                      "steps": sum(t.steps for t in trainers)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
