"""Parameter groups, AdamW and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from clipkit.optim_config import OptimConfig


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


def hold_lr_as_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's learning rate as a 0-d tensor on ``device`` (``train.compile=step``): the schedule then
    writes it in place (``fill_``) and a compiled update reads it as an input instead of specialising on it,
    which would recompile the update at every step."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """The state torch's fused AdamW creates at its first step, for every parameter that has none yet. Made
    before ``masked_adamw_`` is compiled: tensors created inside the compiled update were measured to come
    out as one shared step counter, and state appearing at the first call recompiles the update at the second."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p].update(
                    step=torch.zeros((), dtype=torch.float32, device=p.device),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )


@torch.no_grad()
def masked_adamw_(optimizer: torch.optim.AdamW, finite: torch.Tensor) -> None:
    """``optimizer``'s AdamW update (decoupled weight decay, bias-corrected moments) written as plain tensor
    operations that torch.compile traces into the step's graph, applied only where ``finite`` (a device bool) is
    true: parameters, moments and step counts keep their values otherwise, as the fused kernel's ``found_inf``
    does. It reads and writes the optimizer's own state (``step``, ``exp_avg``, ``exp_avg_sq``; see
    ``init_adamw_state``), so checkpoints are the same as the fused kernel's and a run resumes under either.

    (torch's own ``optimizer.step()`` cannot be traced into a step's graph: the fused kernels are excluded from
    compilation and ``step()`` graph-breaks around itself; none of its implementations skips on a device flag.)
    """
    keep = finite.to(torch.float32)
    for group in optimizer.param_groups:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]  # (made by init_adamw_state)
            step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            grad = p.grad
            new_step = step + keep
            new_avg = exp_avg.lerp(grad, 1 - beta1)
            new_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
            bias1 = 1 - beta1**new_step
            bias2_sqrt = (1 - beta2**new_step).sqrt()
            denom = new_avg_sq.sqrt() / bias2_sqrt + eps
            new_p = p * (1 - lr * wd) - (lr / bias1) * new_avg / denom
            p.copy_(torch.where(finite, new_p, p))
            exp_avg.copy_(torch.where(finite, new_avg, exp_avg))
            exp_avg_sq.copy_(torch.where(finite, new_avg_sq, exp_avg_sq))
            step.copy_(new_step)


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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
