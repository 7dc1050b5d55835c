"""Where the edge trainer meets `edge_client.adversarial`: the channel gate at the end of the
chain before the wire, the simulated attacker's steps and the encoder's penalty, and their
figures for the history and the report (docs/DEFENSES.md).

Nothing new crosses the wire: the simulated attacker trains on the features the edge sends
anyway, and the gate only leaves channels out.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from edge_client.adversarial import ChannelGate, SimulatedAttacker
from edge_client.config import EdgeConfig
from splitnet.models import SplitModel
from splitnet.obfuscation import KEPT_CHANNELS


class AdversaryHook:
    def __init__(self, config: EdgeConfig, attacker: SimulatedAttacker | None, gate: ChannelGate | None) -> None:
        self.defense = config.defense
        self.attacker, self.gate = attacker, gate
        self._steps: list[tuple[float, float]] = []  # the open epoch's attacker steps: (MSE before it, seconds)
        self._last_epoch: dict = {}
        # the channels the last training step sent, and how often the open epoch's steps changed them
        self._sent: list[int] | None = None
        self._changes = 0

    @classmethod
    def create(cls, config: EdgeConfig, split: SplitModel, optimizer: torch.optim.Optimizer) -> "AdversaryHook":
        d = config.defense
        attacker = gate = None
        if d.adv_weight > 0:
            with torch.random.fork_rng(devices=[]):  # its initial weights leave the run's own draws as they were
                torch.manual_seed(config.seed)
                attacker = SimulatedAttacker(split.feature_shape, split.spec.input_shape, d.adv_width, d.adv_blocks,
                                             d.adv_lr).to(config.device)
        if d.prune_ratio > 0:
            channels = split.feature_shape[0]
            gate = ChannelGate(channels, channels - math.floor(d.prune_ratio * channels)).to(config.device)
            # no weight decay: it would pull every score towards 0, where the ranking is a tie
            optimizer.add_param_group({"params": list(gate.parameters()), "weight_decay": 0.0})
        return cls(config, attacker, gate)

    def channels(self) -> list[int] | None:
        """The channels sent now (None: all)."""
        return None if self.gate is None else self.gate.kept()

    def prune(self, z: Tensor, step: bool = False) -> tuple[Tensor, list[int] | None]:
        """The features as sent (the pruned channels zero) and the channels sent (None: all).
        `step`: for a training step, whose change of the channels sent is counted."""
        if self.gate is None:
            return z, None
        kept = self.gate.kept()
        if step:
            self._changes += int(self._sent is not None and kept != self._sent)
            self._sent = kept
        return self.gate(z, kept), kept

    def penalty(self, z_sent: Tensor, x: Tensor, step_id: int) -> Tensor | None:
        """On the steps the simulated attacker trains: train it on this batch and return the term
        whose gradient at `z_sent` is -A times its reconstruction MSE's, for the encoder's loss."""
        if self.attacker is None or step_id % self.defense.adv_every:
            return None
        start = time.perf_counter()
        mse, grad = self.attacker.step(z_sent, x)
        self._steps.append((mse, time.perf_counter() - start))
        return -self.defense.adv_weight * (z_sent * grad).sum()

    def end_epoch(self, seconds: float, epoch: int) -> dict:
        """The epoch's figures for the history: the simulated attacker's mean MSE (before each of its
        steps), its cost in seconds and as a share of the epoch, the channels the gate keeps and how
        often its steps changed them; the gate frozen after epoch `prune_freeze`."""
        record: dict = {}
        if self.attacker is not None and self._steps:
            spent = sum(s for _, s in self._steps)
            record.update({"adv_mse": sum(m for m, _ in self._steps) / len(self._steps), "adv_steps": len(self._steps),
                           "adv_seconds": spent, "adv_seconds_per_step": spent / len(self._steps),
                           "adv_share": spent / seconds if seconds else 0.0})
        if self.gate is not None:
            if self.defense.prune_freeze and epoch >= self.defense.prune_freeze and self.gate.frozen is None:
                self.gate.freeze()
            record.update({"prune_kept_fraction": self.gate.keep / len(self.gate.scores),
                           "prune_kept": self.gate.kept(), "prune_changes": self._changes,
                           "prune_frozen": self.gate.frozen is not None})
        self._steps, self._changes = [], 0
        self._last_epoch = record
        return record

    def summary(self, record: dict) -> str:
        parts = []
        if "adv_mse" in record:
            parts.append(f"; adversary mse {record['adv_mse']:.4g}, {100 * record['adv_share']:.0f}% of the time")
        if "prune_kept" in record:
            parts.append(f"; {len(record['prune_kept'])} channels sent, "
                         + ("fixed" if record["prune_frozen"] else f"changed {record['prune_changes']} time(s)"))
        return "".join(parts)

    def wire_settings(self) -> dict:
        """What a reader of the encoder file needs to replay the chain: the channels it sends."""
        return {} if self.gate is None else {KEPT_CHANNELS: self.channels()}

    def state(self) -> dict | None:
        """What a resumed run needs to go on as this one would: the simulated attacker's weights and
        optimizer, the gate's scores (its momentum is in the encoder's optimizer) and the open
        epoch's figures; None where neither defense is on."""
        if self.attacker is None and self.gate is None:
            return None
        return {"attacker": self.attacker.state() if self.attacker is not None else None,
                "gate": self.gate.state_dict() if self.gate is not None else None,
                "gate_frozen": self.gate.frozen if self.gate is not None else None,
                "sent": self._sent, "changes": self._changes,
                "steps": list(self._steps), "last_epoch": dict(self._last_epoch)}

    def load_state(self, state: dict | None) -> None:
        """Adopt `state` (TypeError or KeyError where it lacks a part this run has)."""
        if self.attacker is not None:
            self.attacker.load_state(state["attacker"])  # type: ignore[index]
        if self.gate is not None:
            self.gate.load_state_dict(state["gate"])  # type: ignore[index]
            # states written before the gate could freeze have neither: a gate that never froze
            self.gate.frozen = state.get("gate_frozen")  # type: ignore[union-attr]
            self._sent, self._changes = state.get("sent"), state.get("changes", 0)  # type: ignore[union-attr]
        if state is not None:
            self._steps, self._last_epoch = list(state["steps"]), dict(state["last_epoch"])

    def report(self) -> dict:
        """The last epoch's figures (none where neither defense is on)."""
        return dict(self._last_epoch)

    def warnings(self) -> list[str]:
        """The report's warning where the channels sent still changed in the last epoch."""
        changes = self._last_epoch.get("prune_changes", 0)
        if not changes:
            return []
        return [f"the channel gate changed the channels it sends {changes} time(s) in the last epoch, so the decoder "
                "has not adapted to the last choice and test accuracy may fall far below training accuracy: fix the "
                "choice after some epochs (--prune-freeze E)"]
