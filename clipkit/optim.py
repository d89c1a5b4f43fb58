"""Parameter groups, AdamW and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from clipkit.errors import Choice, non_negative, positive, require

if TYPE_CHECKING:
    import torch


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


def no_weight_decay(name: str, param: torch.nn.Parameter, exclude_embeddings: bool = False) -> bool:
    """open_clip's trainer's rule, so that its published recipes reproduce: no decay on parameters of fewer than
    2 dimensions (biases, norms, class embedding, logit scale/bias) and on names with ``bn``, ``ln``, ``bias`` or
    ``logit_scale``; token and positional embeddings *are* decayed. ``exclude_embeddings`` (optim.
    exclude_embeddings_from_decay) exempts them too, as many other codebases (timm, BERT-style) do."""
    if param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
        return True
    return exclude_embeddings and ("embedding" in name or name.endswith("_emb"))


IMAGE, TEXT, SHARED = "image", "text", "shared"
_TEXT_ROOTS = ("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text.")
_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding", "patch_embed")


def tower_of(name: str) -> str:
    """Which tower an open_clip parameter belongs to (``CLIP``: ``visual.*`` and the text tower's top-level
    modules; ``CustomTextCLIP``: ``visual.*`` and ``text.*``); the temperature and bias are shared."""
    if name.startswith("visual."):
        return IMAGE
    if name.startswith(_TEXT_ROOTS):
        return TEXT
    return SHARED


def _num_blocks(model: torch.nn.Module, tower: str) -> int | None:
    """Transformer blocks of an open_clip ViT / text transformer tower; None for other towers (timm, HF)."""
    module = model.visual if tower == IMAGE else getattr(model, "text", model)
    blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    return len(blocks) if blocks is not None else None


def layer_id(name: str, tower: str, num_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_blocks + 1 for what follows the blocks (final norm,
    projection, attention pooler)."""
    local = name.removeprefix("visual.").removeprefix("text.")
    if local.startswith("transformer.resblocks."):
        return int(local.split(".")[2]) + 1
    if local.startswith(_EMBEDDINGS):
        return 0
    return num_blocks + 1


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: open_clip's weight-decay rule, each tower's lr and weight decay, and layer-wise LR decay.
    Every group carries ``lr_scale`` (its lr / optim.lr), so the base learning rate can be read back from
    any group; the shared temperature group comes first."""
    towers = {IMAGE: cfg.image, TEXT: cfg.text}
    blocks = {}
    for tower, tcfg in towers.items():
        blocks[tower] = _num_blocks(model, tower)
        if tcfg.layer_decay != 1.0 and blocks[tower] is None:
            module = type(model.visual if tower == IMAGE else getattr(model, "text", model)).__name__
            raise ValueError(
                f"optim.{tower}.layer_decay={tcfg.layer_decay} needs an open_clip transformer tower with "
                f"numbered blocks; this model's {tower} tower is {module}"
            )
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = tower_of(name)
        tcfg = towers.get(tower)
        decays = not no_weight_decay(name, param, cfg.exclude_embeddings_from_decay)
        scale, layer = 1.0, None
        wd = cfg.weight_decay
        if tcfg is not None:
            scale = (tcfg.lr if tcfg.lr is not None else cfg.lr) / cfg.lr
            wd = tcfg.weight_decay if tcfg.weight_decay is not None else cfg.weight_decay
            if tcfg.layer_decay != 1.0:
                layer = layer_id(name, tower, blocks[tower])
                scale *= tcfg.layer_decay ** (blocks[tower] + 1 - layer)
        key = (tower, layer, decays)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "weight_decay": wd if decays else 0.0,
                "lr": cfg.lr * scale,
                "lr_scale": scale,
                "name": f"{tower}" + (f"/layer{layer}" if layer is not None else "") + ("" if decays else "/no_decay"),
            },
        )
        group["params"].append(param)
    order = sorted(groups, key=lambda k: (k[0] != SHARED, k[0], -1 if k[1] is None else k[1], not k[2]))
    return [groups[k] for k in order]


def scheduled_lr(scheduler, lr: float) -> float:
    """optim.lr as the schedule has it now (each group runs at that times its own scale)."""
    return lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # (every group shares the one lambda)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    import torch

    # The fused kernel on GPU and CPU alike: on CPU torch's default is its per-parameter loop (foreach is a GPU
    # default only), and fused took the demo model's update from 13.0 to 2.2 ms (benchmarks/RESULTS.md).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for the update at ``step`` (0-based): linear warmup, then cosine, constant, or
    constant and a linear decay over the last ``decay_fraction`` of the steps (wsd)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        into = step - (total_steps - decay_steps)  # 0 at the first decaying update; the update after the last
        return 1.0 - (1 - cfg.min_lr_ratio) * min(1.0, max(0, into) / decay_steps)  # one would be at min_lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
