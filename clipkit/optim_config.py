"""The optimizer's config (``optim.*``): AdamW, the learning-rate schedule, per-tower overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from clipkit.errors import Choice, non_negative, positive, require


class Schedule(Choice):
    cosine = "cosine"  # to min_lr_ratio x lr
    constant = "constant"
    wsd = "wsd"  # warmup-stable-decay: constant, then linear to min_lr_ratio x lr over the last decay_fraction


@dataclass
class TowerOptimConfig:
    """Per-tower overrides (``optim.image.*``, ``optim.text.*``), for fine-tuning pretrained towers."""

    # This tower's peak learning rate (null = optim.lr); the schedule scales it like every other.
    lr: Optional[float] = None
    # This tower's weight decay on its decayed parameters (null = optim.weight_decay).
    weight_decay: Optional[float] = None
    # Layer-wise LR decay: transformer block i of L runs at lr x layer_decay^(L - i), the embeddings (patch,
    # token, position, class) at ^(L + 1), the final norm and projection at lr (1 = off).
    layer_decay: float = 1.0

    def validate(self, prefix: str) -> None:
        if self.lr is not None:
            require(f"{prefix}.lr", self.lr, self.lr > 0, "must be > 0")
        if self.weight_decay is not None:
            require(f"{prefix}.weight_decay", self.weight_decay, self.weight_decay >= 0, "must be >= 0")
        require(f"{prefix}.layer_decay", self.layer_decay, 0 < self.layer_decay <= 1, "must be in (0, 1]")


@dataclass
class OptimConfig:
    # Peak learning rate of AdamW, reached after the warmup.
    lr: float = 1e-3
    # Decoupled weight decay on weight matrices and embeddings (open_clip's rule: not on biases, norms, temperature).
    weight_decay: float = 0.2
    # AdamW's first-moment decay.
    beta1: float = 0.9
    # AdamW's second-moment decay (CLIP uses 0.98).
    beta2: float = 0.98
    # AdamW's epsilon.
    eps: float = 1e-6
    # Linear warmup from 0 to optim.lr over this many steps.
    warmup_steps: int = 50
    # After warmup.
    schedule: Schedule = Schedule.cosine
    # The schedule ends at lr x min_lr_ratio.
    min_lr_ratio: float = 0.0
    # schedule=wsd: the fraction of the steps over which the learning rate decays at the end.
    decay_fraction: float = 0.2
    # Max global gradient norm; 0 disables clipping.
    grad_clip_norm: float = 1.0
    # Weight decay follows open_clip's trainer (token and positional embeddings decayed); true exempts them.
    exclude_embeddings_from_decay: bool = False
    # The image tower's own lr / weight decay / layer-wise LR decay.
    image: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    # The text tower's own lr / weight decay / layer-wise LR decay.
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)

    def validate(self, prefix: str = "optim") -> None:
        self.image.validate(f"{prefix}.image")
        self.text.validate(f"{prefix}.text")
        positive(prefix, self, "lr", "eps")
        non_negative(prefix, self, "weight_decay", "warmup_steps", "grad_clip_norm", "min_lr_ratio")
        for name in ("beta1", "beta2"):
            require(f"{prefix}.{name}", getattr(self, name), 0 <= getattr(self, name) < 1, "must be in [0, 1)")
        require(f"{prefix}.min_lr_ratio", self.min_lr_ratio, self.min_lr_ratio <= 1, "must be <= 1")
        ok = 0 < self.decay_fraction <= 1
        require(f"{prefix}.decay_fraction", self.decay_fraction, ok, "must be in (0, 1]")
