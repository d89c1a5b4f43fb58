"""Parameter groups, AdamW and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipkit.errors import Choice, non_negative, positive, require

if TYPE_CHECKING:
    import torch


class Schedule(Choice):
    cosine = "cosine"  # to min_lr_ratio x lr
    constant = "constant"


@dataclass
class OptimConfig:
    # Peak learning rate of AdamW, reached after the warmup.
    lr: float = 1e-3
    # Decoupled weight decay (not applied to biases, norms, embeddings, temperature).
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
    # Max global gradient norm; 0 disables clipping.
    grad_clip_norm: float = 1.0
    # Weight decay follows open_clip's trainer (token and positional embeddings decayed); true exempts them.
    exclude_embeddings_from_decay: bool = False

    def validate(self, prefix: str = "optim") -> None:
        positive(prefix, self, "lr", "eps")
        non_negative(prefix, self, "weight_decay", "warmup_steps", "grad_clip_norm", "min_lr_ratio")
        for name in ("beta1", "beta2"):
            require(f"{prefix}.{name}", getattr(self, name), 0 <= getattr(self, name) < 1, "must be in [0, 1)")
        require(f"{prefix}.min_lr_ratio", self.min_lr_ratio, self.min_lr_ratio <= 1, "must be <= 1")


def no_weight_decay(name: str, param: torch.nn.Parameter, exclude_embeddings: bool = False) -> bool:
    """open_clip's trainer's rule, so that its published recipes reproduce: no decay on parameters of fewer than
    2 dimensions (biases, norms, class embedding, logit scale/bias) and on names with ``bn``, ``ln``, ``bias`` or
    ``logit_scale``; token and positional embeddings *are* decayed. ``exclude_embeddings`` (optim.
    exclude_embeddings_from_decay) exempts them too, as many other codebases (timm, BERT-style) do."""
    if param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
        return True
    return exclude_embeddings and ("embedding" in name or name.endswith("_emb"))


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_embeddings: bool = False) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param, exclude_embeddings) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    import torch

    # Fused AdamW is the fast path on GPU; on CPU the foreach implementation is the fast one.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.exclude_embeddings_from_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for the update at ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
