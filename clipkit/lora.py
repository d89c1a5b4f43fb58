"""LoRA (``model.lora.*``): low-rank adapters on the transformer blocks of pretrained towers, through peft.

- **Where.** peft's LoRA layer for ``nn.Linear`` wraps a layer's ``forward``. open_clip's blocks call
  ``nn.MultiheadAttention``, which reads its ``in_proj_weight`` and ``out_proj.weight`` directly and never calls a
  projection's ``forward`` (peft's own MultiheadAttention adapter works around that by merging and unmerging the
  weights around every call, re-registering the parameters, which FSDP's sharded parameters do not survive). So
  the attention of an adapted block is first rebuilt as ``ProjectedAttention``: the same weights in two
  ``nn.Linear`` layers, the same computation through ``scaled_dot_product_attention``. The MLP's ``c_fc`` and
  ``c_proj`` are ``nn.Linear`` already.
- **What trains.** The adapters; in the adapted towers nothing else. A tower without adapters, the temperature and
  the bias train as they would without LoRA (or stay locked: ``model.lock_*``).
- **Checkpoints.** What is saved is the model's state without its frozen parameters (``saved_weights``): the
  adapters, whatever else trains, and the buffers, with the optimizer state of what trains. The frozen weights
  come from ``model.pretrained`` / ``model.init_from`` again when a run resumes, is evaluated or is exported;
  ``lora.json`` holds their SHA-256 (``base_digest``), checked then (a changed file is refused, never trained on).
- **Exports and eval.** ``merged`` folds every adapter into its layer (W + (alpha / r) B A) and puts
  ``nn.MultiheadAttention`` back, which leaves a plain open_clip model with open_clip's names and shapes: every
  export format loads it without peft.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clipkit import checkpoint as ckpt
from clipkit.errors import ConfigError, UserError
from clipkit.model_config import LoraConfig, LoraTarget
from clipkit.optim import tower_of

STATE_FILE = "lora.json"


class BaseChanged(UserError, ValueError):
    """A LoRA checkpoint's frozen weights (from model.pretrained / init_from) are not the ones it trained on."""

    kind = "checkpoint error"


class ProjectedAttention(nn.Module):
    """Self-attention as ``nn.MultiheadAttention`` computes it, with the input and output projections as
    ``nn.Linear`` layers called through their ``forward`` (what an adapter wraps). Built from, and turned back
    into, an ``nn.MultiheadAttention`` with the same weights."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only self-attention with one input projection is rebuilt")
        dim = mha.embed_dim
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        self.in_proj = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.requires_grad_(mha.in_proj_weight.requires_grad)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **unused):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("ProjectedAttention is self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, dim = x.shape
        q, k, v = self.in_proj(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def to_mha(self) -> nn.MultiheadAttention:
        dim = self.out_proj.in_features
        mha = nn.MultiheadAttention(
            dim, self.num_heads, dropout=self.dropout, bias=self.in_proj.bias is not None, batch_first=self.batch_first
        )
        mha.to(device=self.in_proj.weight.device, dtype=self.in_proj.weight.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(self.in_proj.weight)
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if self.in_proj.bias is not None:
                mha.in_proj_bias.copy_(self.in_proj.bias)
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha


def _blocks(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, block) pairs that get adapters: each adapted tower's transformer blocks, its last
    ``cfg.blocks`` only when that is set."""
    chosen = []
    for tower in ("image", "text"):
        if not cfg.adapts(tower):
            continue
        blocks = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, ResidualAttentionBlock) and tower_of(name + ".") == tower
        ]
        if not blocks:
            raise ConfigError(
                "model.lora.towers",
                cfg.towers,
                f"the {tower} tower of this model has no open_clip transformer blocks to adapt (timm and HF towers "
                "are not supported); choose the other tower",
            )
        chosen += blocks[-cfg.blocks :] if cfg.blocks else blocks
    return chosen


def apply(model: nn.Module, cfg: LoraConfig) -> str | None:
    """Adds the adapters ``cfg`` asks for to ``model`` in place (before any engine sees it) and freezes the
    adapted towers' own weights. Returns a line for the run log (None: no LoRA)."""
    if not cfg.on:
        return None
    from peft import LoraConfig as PeftLoraConfig  # (optional dependency: the lora extra)
    from peft import inject_adapter_in_model

    before = {name: p.requires_grad for name, p in model.named_parameters()}
    targets = []
    for name, block in _blocks(model, cfg):
        if LoraTarget.attn in cfg.targets:
            if not isinstance(block.attn, nn.MultiheadAttention):
                raise ConfigError("model.lora.targets", "attn", f"{name}.attn is not nn.MultiheadAttention")
            block.attn = ProjectedAttention(block.attn)
            targets += [f"{name}.attn.in_proj", f"{name}.attn.out_proj"]
        if LoraTarget.mlp in cfg.targets:
            targets += [f"{name}.mlp.c_fc", f"{name}.mlp.c_proj"]
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    inject_adapter_in_model(peft_cfg, model)  # (adapters are initialised from the seeded RNG: B = 0, A random)
    for name, p in model.named_parameters():  # peft froze everything but the adapters; put the rest back
        base = base_name(name)
        if ".lora_" in name:
            p.requires_grad_(True)
        elif cfg.adapts(tower_of(base)):
            p.requires_grad_(False)
        else:
            p.requires_grad_(before[base])
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    return (
        f"LoRA r={cfg.rank} alpha={cfg.alpha:g} on {len(targets)} layers "
        f"({'both towers' if cfg.towers == 'both' else f'{cfg.towers} tower'}, "
        f"{'+'.join(str(t) for t in cfg.targets)}): {adapters / 1e6:.3f}M adapter params; "
        f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M params trainable"
    )


def base_name(name: str) -> str:
    """A parameter's name in the model before LoRA (peft moves a wrapped layer's weights under ``base_layer``)."""
    return (
        name.replace(".base_layer.", ".")
        .replace(".in_proj.weight", ".in_proj_weight")
        .replace(".in_proj.bias", ".in_proj_bias")
    )


def is_adapted(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def saved_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``weights`` (``model``'s state dict, or a consolidated copy with its names): all
    of it without LoRA; with LoRA, all but the frozen parameters."""
    if not is_adapted(model):
        return weights
    frozen = frozen_names(model)
    return {k: v for k, v in weights.items() if k not in frozen}


def load_saved(model: nn.Module, weights: dict[str, torch.Tensor], source) -> None:
    """Loads what ``saved_weights`` kept into an adapted model: every key but the frozen parameters must be there
    (the frozen ones are the base weights, already in place)."""
    expected = set(model.state_dict()) - frozen_names(model)
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ConfigError(
            "checkpoint",
            str(source),
            f"holds other weights than this LoRA model saves (missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    model.load_state_dict(weights, strict=False)


def base_digest(model: nn.Module) -> str:
    """SHA-256 over the frozen parameters (names, shapes, dtypes and bytes, by name): the base weights a LoRA
    checkpoint needs besides its own files. Taken before any engine shards the model."""
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in sorted(frozen_names(model)):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{base_name(name)}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(path: Path, digest: str) -> None:
    ckpt.save_json(Path(path) / STATE_FILE, {"base_sha256": digest})


def check_base(path: Path, digest: str, cfg) -> None:
    """Refuses checkpoint ``path`` when the frozen weights built from ``cfg`` (the model config) differ from the
    ones it trained on."""
    saved = ckpt.load_json(Path(path) / STATE_FILE)["base_sha256"]
    if saved != digest:
        source = cfg.init_from or cfg.pretrained
        raise BaseChanged(
            f"{path} holds LoRA adapters trained on other base weights than {source} holds now (SHA-256 of the "
            "frozen weights differs): the weights behind model.init_from / model.pretrained (for a run dir, its "
            "newest checkpoint) changed since that run; point it at the weights the adapters were trained on"
        )


def merged(model: nn.Module) -> nn.Module:
    """``model`` with every adapter folded into its layer and ``nn.MultiheadAttention`` back in place of
    ``ProjectedAttention``: a plain open_clip model (in place; returned for convenience)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            with torch.no_grad():
                module.merge()
            _replace(model, name, module.get_base_layer())
    for name, module in list(model.named_modules()):
        if isinstance(module, ProjectedAttention):
            _replace(model, name, module.to_mha())
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
