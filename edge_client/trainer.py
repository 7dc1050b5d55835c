"""Train the encoder through a (remote) decoder, then evaluate through it; return the report.

One step: z = F_e(x); z' = obfuscate(z); send z' and y; the cloud returns dL/dz'; the
encoder backpropagates it (plus NoPeek and, through the two-phase merge, CEM) and steps.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from edge_client.config import EdgeConfig
from edge_client.defense import Obfuscation, nopeek_loss
from edge_client.report import percentile
from splitnet import data, models
from splitnet.cloud_api import Cloud

log = logging.getLogger(__name__)


@dataclass
class EdgeState:
    """What an edge owns: its encoder half, its optimizer and its defense."""

    split: models.SplitModel
    optimizer: torch.optim.Optimizer
    obfuscation: Obfuscation
    surrogate: torch.nn.Module | None = None
    history: list[dict] = field(default_factory=list)


def build_edge(config: EdgeConfig, num_classes: int, input_shape: tuple[int, int, int]) -> EdgeState:
    torch.manual_seed(config.seed)
    split = models.build(models.SplitSpec(config.arch, config.cut, num_classes, input_shape, config.bottleneck))
    split.encoder.to(config.device)
    optimizer = _optim(config).make(split.encoder.parameters())
    gen = torch.Generator().manual_seed(config.seed + 1)
    return EdgeState(split, optimizer, Obfuscation(config.defense, generator=gen))


def _optim(config: EdgeConfig) -> models.OptimSpec:
    return models.OptimSpec(config.lr, config.momentum, config.weight_decay)


def run(config: EdgeConfig, cloud: Cloud, splits: data.Splits | None = None,
        train_set: Dataset | None = None) -> dict:
    """Train and evaluate; `train_set` overrides the training data (a client's shard)."""
    splits = splits or data.load(config.data)
    train_set = train_set if train_set is not None else splits.train
    edge = build_edge(config, splits.num_classes, splits.input_shape)
    client_id = config.client_id or uuid.uuid4().hex[:12]
    first_step = cloud.open(config.job, client_id, edge.split, _optim(config), config.grad_codec, config.seed) + 1
    try:
        train_stats = train(config, cloud, edge, train_set, first_step)
        accuracy = evaluate(config, cloud, edge, splits.test)
    finally:
        cloud.close()
    return _report(config, cloud, edge, client_id, train_stats, accuracy, len(train_set))


def train(config: EdgeConfig, cloud: Cloud, edge: EdgeState, train_set: Dataset, first_step: int = 1) -> dict:
    from edge_client.cem_hook import CemHook

    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(config.seed))
    encoder, defense = edge.split.encoder, config.defense
    cem = CemHook.create(config, edge)
    step_id, steps, samples, busy = first_step - 1, 0, 0, 0.0
    epoch_loss = float("nan")
    bar = tqdm(total=config.max_steps or config.epochs * len(loader), desc="train", unit="step",
               disable=not config.progress, leave=False)
    for epoch in range(1, config.epochs + 1):
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        encoder.train()
        for x, y in loader:
            x, y = x.to(config.device), y.to(config.device)
            step_id += 1
            z = encoder(x)
            z_sent = edge.obfuscation(z)
            reply = cloud.train(step_id, z_sent.detach(), y.cpu(), config.codec)
            edge.optimizer.zero_grad(set_to_none=True)
            if reply.grad is not None:
                task = (z_sent * reply.grad.to(z_sent.device)).sum()  # d task / d z_sent == the cloud's gradient
                if defense.nopeek > 0:
                    task = task + defense.nopeek * nopeek_loss(x, z)
                cem.backward(task, z, y, epoch)
                edge.optimizer.step()
            loss_sum += reply.loss * len(y)
            correct += reply.correct
            seen += len(y)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{reply.loss:.3f}", epoch=epoch)
            if config.max_steps and steps >= config.max_steps:
                break
        elapsed = time.perf_counter() - start
        busy += elapsed
        samples += seen
        epoch_loss = loss_sum / max(seen, 1)
        record = {"epoch": epoch, "train_loss": epoch_loss, "train_accuracy": correct / max(seen, 1),
                  "samples_per_second": seen / elapsed if elapsed else 0.0, **cem.end_epoch(epoch, train_set)}
        edge.history.append(record)
        log.info("epoch %d: loss %.4f acc %.3f, %.0f samples/s%s", epoch, epoch_loss, record["train_accuracy"],
                 record["samples_per_second"], cem.summary(record))
        if config.max_steps and steps >= config.max_steps:
            break
    bar.close()
    return {"steps": steps, "train_samples": samples, "train_loss": epoch_loss, "train_seconds": busy,
            "epochs": len(edge.history), "last_step_id": step_id, **cem.report(train_set)}


@torch.no_grad()
def encode(edge: EdgeState, x: torch.Tensor) -> torch.Tensor:
    """Features as the cloud receives them at inference (eval mode, obfuscation on)."""
    edge.split.encoder.eval()
    return edge.obfuscation(edge.split.encoder(x))


def evaluate(config: EdgeConfig, cloud: Cloud, edge: EdgeState, test_set: Dataset) -> float:
    labels: deque[torch.Tensor] = deque()

    def batches():
        for x, y in DataLoader(test_set, batch_size=config.batch_size * 4):
            labels.append(y)
            yield encode(edge, x.to(config.device))

    correct = total = 0
    for logits in cloud.infer(batches(), config.codec):
        y = labels.popleft()
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def _report(config: EdgeConfig, cloud: Cloud, edge: EdgeState, client_id: str, train_stats: dict,
            accuracy: float, n_train: int) -> dict:
    samples = train_stats["train_samples"]
    seconds = train_stats.pop("train_seconds")
    spec = edge.split.spec
    return {
        "test_accuracy": accuracy,
        "train_loss": train_stats["train_loss"],
        "epochs": train_stats["epochs"],
        "steps": train_stats["steps"],
        "train_samples": samples,
        "bytes_up": cloud.bytes_up,
        "bytes_down": cloud.bytes_down,
        "bytes_up_per_sample": cloud.bytes_up / max(samples, 1),
        "bytes_down_per_sample": cloud.bytes_down / max(samples, 1),
        "wall_seconds": seconds,
        "samples_per_second": samples / seconds if seconds else 0.0,
        "rtt_ms_p50": percentile(cloud.rtt_ms, 50),
        "rtt_ms_p99": percentile(cloud.rtt_ms, 99),
        "codec": config.codec,
        "grad_codec": config.grad_codec,
        "arch": spec.arch,
        "cut": spec.cut,
        "bottleneck": spec.bottleneck,
        "feature_shape": list(edge.split.feature_shape),
        "dataset": config.data.name,
        "train_set_size": n_train,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "job": config.job,
        "client_id": client_id,
        "server": config.connection.server,
        "reconnects": cloud.reconnects,
        "replayed_steps": cloud.replayed_steps,
        "defense": asdict(config.defense),
        "history": edge.history,
        **{k: v for k, v in train_stats.items() if k not in ("train_loss", "epochs", "steps", "train_samples")},
    }

