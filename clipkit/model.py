"""Building the dual encoder through open_clip: by name, from a shipped config, or from a user JSON.

clipkit ships small configs (``clipkit/model_configs/*.json``) registered with ``open_clip.add_model_config``.
Weights are only ever read from local files: there is no network at run time on many clusters, and a hub
request would stall for a minute before failing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from clipkit.config import ModelConfig

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
_registered = False


def _register_shipped() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(SHIPPED_CONFIGS)
        _registered = True


def is_known_model(name: str) -> bool:
    _register_shipped()
    return name in open_clip.list_models()


def resolve_name(cfg: ModelConfig) -> str:
    """The open_clip model name for ``cfg``, registering ``cfg.config`` (under its file stem) if given."""
    _register_shipped()
    if cfg.config:
        path = Path(cfg.config).expanduser()
        open_clip.add_model_config(path)
        return path.stem
    return cfg.name


def model_config(cfg: ModelConfig) -> dict:
    return open_clip.get_model_config(resolve_name(cfg))


@contextlib.contextmanager
def quiet_root_logger(level: int = logging.ERROR):
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, level))
    try:
        yield
    finally:
        root.setLevel(old)


@dataclass
class Built:
    model: torch.nn.Module
    tokenizer: object
    name: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    context_length: int = 77


def build(cfg: ModelConfig, device: torch.device | str = "cpu") -> Built:
    """Creates the open_clip model (fp32 master weights; autocast handles low precision) and its tokenizer."""
    name = resolve_name(cfg)
    init = {
        k: v
        for k, v in (("init_logit_scale", cfg.init_logit_scale), ("init_logit_bias", cfg.init_logit_bias))
        if v is not None
    }
    if cfg.patch_dropout:
        init["force_patch_dropout"] = cfg.patch_dropout
    with quiet_root_logger():  # open_clip warns that no weights were loaded: random init is what pretraining wants
        model = open_clip.create_model(name, pretrained=cfg.pretrained, device=device, output_dict=True, **init)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return _built(model, open_clip.get_tokenizer(name), name)


def from_open_clip_folder(path: Path, device: torch.device | str = "cpu") -> Built:
    """An exported open_clip folder (``open_clip_config.json`` + weights), loaded by open_clip itself."""
    name = f"local-dir:{Path(path).expanduser().resolve()}"
    with quiet_root_logger():
        model = open_clip.create_model(name, device=device, output_dict=True)
    return _built(model, open_clip.get_tokenizer(name), name)


def _built(model: torch.nn.Module, tokenizer, name: str) -> Built:
    pre = model.visual.preprocess_cfg
    size = pre["size"]
    return Built(
        model=model,
        tokenizer=tokenizer,
        name=name,
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        context_length=int(getattr(model, "context_length", 77)),
    )
