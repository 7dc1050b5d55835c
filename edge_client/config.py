"""Edge settings; the CLI maps its flags onto these fields (and `defense` onto DefenseConfig).

Free of torch (the `cem` package is imported where its defaults are read), so that the
command lines can build their parsers and show these defaults without importing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from splitnet.schedule import LrSchedule
from splitnet.settings import (ARCHS, DataSpec, InvalidSetting, ObfuscationConfig, at_least, finite,
                               obfuscation_checks, require, require_fields, width_check)
from splitnet.wire import DEFAULT_MAX_MESSAGE_MB, MAX_KEPT_REPLIES

DEFAULT_SCHEDULE = "cosine"
CEM_CHOICES = ("none", "gmm", "gated", "slot")  # "none" and cem.SURROGATES' names


@dataclass(frozen=True)
class DefenseConfig(ObfuscationConfig):
    """The obfuscation fields (noise, noise_kind, dropout, topk), the training-time losses and the
    learned channel pruning."""

    nopeek: float = 0.0  # w: weight of dCor(x, z) in the task loss
    cem: str = "none"
    lam: float = 0.0  # lambda: weight of the CEM gradient on the encoder
    var_threshold: float = 0.125
    cem_scale: float | None = None  # attention_loss_scale; None: cem.DEFAULTS
    cem_warmup: int | None = None  # epochs without CEM; None: cem.DEFAULTS
    cem_gates: bool | None = None  # gated / slot: soft and SNR gates on; None: cem.DEFAULTS
    learn_gates: bool = True
    # Attacker-aware training (docs/DEFENSES.md §1): a simulated inverse network trained on the sent
    # features every adv_every steps; the encoder's loss adds -adv_weight times its reconstruction MSE.
    adv_weight: float = 0.0  # A; 0: no simulated attacker
    adv_blocks: int = 2  # its residual blocks
    adv_width: int = 32  # its channels
    adv_every: int = 1  # steps between its steps (and the encoder's penalty)
    adv_lr: float = 1e-3  # its Adam rate
    # Learned channel pruning (docs/DEFENSES.md §2): this share of the feature channels is zeroed
    # and not sent, which ones decided by a learned score per channel.
    prune_ratio: float = 0.0
    # Epochs after which the channels sent stop changing (0: the scores choose them to the end). A
    # selection that still changes when training ends leaves the decoder no time to adapt to the
    # last one: at a constant low lr the scores stay close and the choice flips all along.
    prune_freeze: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidSetting naming the first bad field."""
        checks: list[tuple[str, bool, str]] = [
            *obfuscation_checks(self.noise, self.noise_kind, self.dropout, self.topk),
            ("nopeek", finite(self.nopeek) and self.nopeek >= 0, "a finite number >= 0"),
            ("cem", self.cem in CEM_CHOICES, f"one of {CEM_CHOICES}"),
            ("lam", finite(self.lam) and self.lam >= 0, "a finite number >= 0"),
            ("var_threshold", finite(self.var_threshold) and self.var_threshold > 0, "a finite number > 0"),
            ("cem_scale", self.cem_scale is None or (finite(self.cem_scale) and self.cem_scale >= 0),
             "None or a finite number >= 0"),
            ("cem_warmup", self.cem_warmup is None or (isinstance(self.cem_warmup, int) and self.cem_warmup >= 0),
             "None or an int >= 0"),
            ("adv_weight", finite(self.adv_weight) and self.adv_weight >= 0, "a finite number >= 0"),
            ("adv_blocks", isinstance(self.adv_blocks, int) and self.adv_blocks >= 0, "an int >= 0"),
            ("adv_width", isinstance(self.adv_width, int) and self.adv_width >= 1, "an int >= 1"),
            ("adv_every", isinstance(self.adv_every, int) and self.adv_every >= 1, "an int >= 1"),
            ("adv_lr", finite(self.adv_lr) and self.adv_lr > 0, "a finite number > 0"),
            ("prune_ratio", finite(self.prune_ratio) and 0 <= self.prune_ratio < 1, "in [0, 1)"),
            ("prune_freeze", isinstance(self.prune_freeze, int) and self.prune_freeze >= 0
             and (self.prune_freeze == 0 or self.prune_ratio > 0), "an int >= 0, and 0 unless prune_ratio > 0"),
        ]
        require_fields(self, checks)

    @property
    def scale(self) -> float:
        """attention_loss_scale in use (0 without CEM)."""
        if self.cem == "none":
            return 0.0
        import cem

        return float(self.cem_scale if self.cem_scale is not None else cem.DEFAULTS[self.cem]["scale"])

    @property
    def warmup(self) -> int:
        """Warm-up epochs in use (0 without CEM)."""
        if self.cem == "none":
            return 0
        import cem

        return int(self.cem_warmup if self.cem_warmup is not None else cem.DEFAULTS[self.cem]["warmup"])

    @property
    def gates(self) -> bool | None:
        """Whether the gated / slot surrogate runs its soft and SNR gates (None for the others)."""
        if self.cem not in ("gated", "slot"):
            return None
        import cem

        return bool(self.cem_gates if self.cem_gates is not None else cem.DEFAULTS[self.cem]["gates"])

    def cem_active(self, epoch: int) -> bool:
        """Whether CEM runs in this epoch (counted from 1)."""
        if self.cem == "none":
            return False
        import cem

        return cem.is_active(self.lam, self.noise, epoch, self.warmup)

    @property
    def obfuscation(self) -> ObfuscationConfig:
        """The settings of the chain applied before the wire (and by a noise-aware attacker)."""
        return ObfuscationConfig(self.noise, self.noise_kind, self.dropout, self.topk)

    def as_dict(self) -> dict[str, Any]:
        """The fields with the CEM defaults resolved, for reports (stable keys)."""
        return {**asdict(self), "cem_scale": self.scale, "cem_warmup": self.warmup, "cem_gates": self.gates}



DETECTORS = ("none", "splitguard", "alignment")


HIJACK_EXIT = 3  # `edge-client`'s exit status when its --detect stopped the run (edge_client.detect.HijackDetected)


@dataclass(frozen=True)
class DetectConfig:
    """The edge's hijacking detector (`edge_client.detect`; docs/DEFENSES.md §5). The defaults are
    the ones measured in docs/RESULTS_HIJACK.md: 10 of 10 hijacking runs stopped, none of 10
    honest runs, on digits."""

    detect: str = "none"  # "splitguard" (fake batches) or "alignment" (the label alignment alone, no fake batch)
    detect_fake_rate: float = 0.2  # share of the steps after detect_start sent with wrong labels
    detect_threshold: float = 0.5  # SplitGuard score below this: detected (honest ~1, hijacker ~0.25)
    detect_start: int = 10  # no fake batch, and no real gradient kept, up to this step (training settles)
    detect_every: int = 2  # steps between scores
    detect_min_fakes: int = 3  # fake batches before the first score
    detect_alignment_threshold: float = 0.1  # alignment: label alignment below this: detected (honest >= 0.2)

    def __post_init__(self) -> None:
        require_fields(self, [
            ("detect", self.detect in DETECTORS, f"one of {DETECTORS}"),
            ("detect_fake_rate", finite(self.detect_fake_rate) and 0 < self.detect_fake_rate < 1, "in (0, 1)"),
            ("detect_threshold", finite(self.detect_threshold) and 0 < self.detect_threshold < 1, "in (0, 1)"),
            ("detect_start", isinstance(self.detect_start, int) and self.detect_start >= 0, "an int >= 0"),
            ("detect_every", isinstance(self.detect_every, int) and self.detect_every >= 1, "an int >= 1"),
            ("detect_min_fakes", isinstance(self.detect_min_fakes, int) and self.detect_min_fakes >= 1, "an int >= 1"),
            ("detect_alignment_threshold", finite(self.detect_alignment_threshold)
             and -1 < self.detect_alignment_threshold < 1, "in (-1, 1)"),
        ])

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "detect"}


@dataclass(frozen=True)
class ConnectionConfig:
    server: str = "127.0.0.1:50051"
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    deadline_s: float = 30.0  # per call / per training step
    connect_s: float = 20.0  # how long the first connection is tried (a wrong --server fails after this)
    reconnect_s: float = 60.0  # how long to keep retrying a server that went away mid-run
    pipeline: int = 0  # steps sent ahead of the last gradient received (0: lock-step)
    tls_ca: str = ""  # PEM CA that signed the server's certificate; any TLS field on: the channel uses TLS
    tls_cert: str = ""  # PEM client certificate, for a server that requires mutual TLS
    tls_key: str = ""  # PEM private key of tls_cert
    tls_server_name: str = ""  # verify the server certificate for this name (connecting via a forwarder / IP)
    auth_token: str = field(default="", repr=False)  # bearer token; out of repr so logs never show it

    def __post_init__(self) -> None:
        require("ConnectionConfig", [at_least("pipeline", self.pipeline, 0)])


LABEL_DEFENSES = ("none", "gaussian", "max_norm", "marvell")  # edge_client.label_defense
WITHOUT_STRENGTH = ("none", "max_norm")  # kinds with no parameter: a strength there would be a typo


@dataclass(frozen=True)
class EdgeConfig:
    """An edge run's settings, checked as they are made (InvalidSetting naming the field), so that
    the Python API and Ray runs refuse what `edge-client` refuses. Whether the files it names exist
    is checked where they are read: a config is data, and may be made where they do not exist."""

    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    data: DataSpec = field(default_factory=DataSpec)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    arch: str = "cnn"
    cut: str = ""  # empty: the architecture's default
    bottleneck: int = 0
    width: float = 1.0  # channel multiplier of the architecture
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = DEFAULT_SCHEDULE  # constant | cosine | multistep:E1,E2,...:GAMMA (splitnet.schedule)
    warmup_epochs: float = 0.0
    augment: str = "auto"  # auto | on | off: seeded crop + flip of the training images (auto: on unless grey)
    codec: str = "fp32"
    grad_codec: str = "fp32"
    seed: int = 0
    job: str = "default"
    client_id: str = ""  # empty: a fresh random id
    max_steps: int = 0  # stop after this many training steps (0: run all epochs)
    # steps in an epoch, carrying on through the data across passes (a virtual client's turn of
    # --local-steps, and the schedule's epoch); 0: an epoch is one pass over the training data
    epoch_steps: int = 0
    device: str = "cpu"
    report: str = ""
    save_encoder: str = ""  # write the trained encoder here (what an attacker who unpacks the device gets)
    # Continue a trained split model: the encoder's weights from this encoder file (of the same
    # model) and, with init_job, a new job's decoder from that job's (the cloud's) weights.
    init_from: str = ""
    init_job: str = ""
    # The U-shaped split (u_shaped): the edge also keeps the layers after `head_cut` and the loss, so
    # its labels never travel; what travels up in their place is dLoss/d(the cloud's output), which
    # label_defense ("none" | "gaussian" | "max_norm" | ...) defends with label_defense_strength.
    u_shaped: bool = False
    head_cut: str = ""  # u_shaped: the stage where the cloud's middle ends; empty: the last (the edge keeps the classifier)
    label_defense: str = "none"
    label_defense_strength: float = 0.0
    log_dir: str = ""  # TensorBoard event files of this run (splitnet.tracking); empty: none
    progress: bool = True
    # The edge's resumable state (edge_client.state): written to state_dir at the start, every
    # state_every steps, at each epoch's end and at the end; empty: none is written.
    state_dir: str = ""
    state_every: int = 10  # at most MAX_KEPT_REPLIES: the server keeps the replies of the steps after a state
    resume: bool = False  # carry on from state_dir's state if it holds one
    fresh_on_bad_state: bool = False  # a damaged or another run's state: start fresh (warning) instead of refusing

    def __post_init__(self) -> None:
        d = self.defense
        require("EdgeConfig", [
            at_least("epochs", self.epochs, 1), at_least("batch_size", self.batch_size, 1),
            at_least("bottleneck", self.bottleneck, 0), at_least("max_steps", self.max_steps, 0),
            at_least("epoch_steps", self.epoch_steps, 0),
            ("lr", finite(self.lr) and self.lr > 0, lambda name: f"{name('lr')} must be > 0"),
            ("defense.lam", d.cem == "none" or d.lam > 0,
             lambda name: f"{name('defense.cem')} {d.cem} needs a positive CEM weight: pass {name('defense.lam')} "
                          f"(e.g. {name('defense.lam')} 16)"),
            ("init_job", not self.init_job or self.init_job != self.job,
             lambda name: f"{name('init_job')} {self.init_job} names this run's own {name('job')}; a continuation "
                          "trains a new job"),
            ("resume", not self.resume or bool(self.state_dir),
             lambda name: f"{name('resume')} needs {name('state_dir')} DIR (where an earlier run wrote its state)"),
            ("state_every", 1 <= self.state_every <= MAX_KEPT_REPLIES,
             lambda name: f"{name('state_every')} must be 1..{MAX_KEPT_REPLIES} (the server keeps the replies of at "
                          f"most {MAX_KEPT_REPLIES} steps after a state, for a resumed edge to get them again)"),
            ("arch", self.arch in ARCHS, lambda name: f"{name('arch')} must be one of {ARCHS}, got {self.arch!r}"),
            width_check(self.width),
            ("head_cut", not self.head_cut or self.u_shaped,
             lambda name: f"{name('head_cut')} is a setting of the U-shaped split: add {name('u_shaped')}"),
            ("label_defense", self.label_defense in LABEL_DEFENSES,
             lambda name: f"{name('label_defense')} must be one of {LABEL_DEFENSES}, got {self.label_defense!r}"),
            at_least("label_defense_strength", self.label_defense_strength, 0.0),
            ("label_defense_strength", self.label_defense not in WITHOUT_STRENGTH or not self.label_defense_strength,
             lambda name: f"{name('label_defense')} {self.label_defense} takes no {name('label_defense_strength')}"),
            ("label_defense", self.label_defense == "none" or self.u_shaped,
             lambda name: f"{name('label_defense')} defends what a U-shaped edge sends up: add {name('u_shaped')} "
                          "(the vanilla split sends its labels in clear)"),
            ("u_shaped", not self.u_shaped or self.connection.pipeline == 0,
             lambda name: f"{name('u_shaped')} runs lock-step: drop {name('connection.pipeline')} (each step waits "
                          "for the cloud twice, the head's gradient depending on the cloud's output)"),
            ("u_shaped", not self.u_shaped or self.detect.detect == "none",
             lambda name: f"{name('u_shaped')}: the hijacking detectors ({name('detect.detect')}) need the vanilla "
                          "split (SplitGuard sends fake labels, which a U-shaped edge never sends)"),
        ])
        try:
            LrSchedule.parse(self.lr_schedule, self.epochs, warmup_epochs=self.warmup_epochs)
        except ValueError as err:
            message = str(err)
            raise InvalidSetting("EdgeConfig", "lr_schedule", lambda name: message.replace(
                "lr_schedule.warmup_epochs", name("warmup_epochs")).replace("lr_schedule.", name("lr_schedule") + " ")
            ) from None
        if self.cut or self.head_cut:  # the cut names come from building the stages (torch): only if set
            from splitnet import models

            require("EdgeConfig", [models.cut_check(self.arch, self.cut or models.default_cut(self.arch))])
            if self.head_cut:
                require("EdgeConfig", [models.head_cut_check(self.arch, self.cut or models.default_cut(self.arch),
                                                             self.head_cut)])

    def split_head_cut(self) -> str:
        """The SplitSpec's `head_cut`: empty for the vanilla split, else `head_cut` or the last stage."""
        if not self.u_shaped:
            return ""
        from splitnet import models

        return self.head_cut or models.cut_points(self.arch)[-1]
