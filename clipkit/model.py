"""Building the dual encoder through open_clip: by name, from a shipped config, or from a user JSON.

clipkit ships small configs (``clipkit/model_configs/*.json``) registered with ``open_clip.add_model_config``.
Weights are only ever read from local files: there is no network at run time on many clusters, and a hub
request would stall for a minute before failing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from clipkit.errors import PATH, ConfigError, require

if TYPE_CHECKING:
    import torch


@dataclass
class ModelConfig:
    # open_clip model name (``ViT-B-32``) or a config shipped with clipkit (``clipkit-tiny``).
    name: str = "clipkit-tiny"
    # Path to an open_clip model JSON (embed_dim, vision_cfg, text_cfg); overrides ``name``.
    config: Optional[str] = field(default=None, metadata=PATH)
    # Local weights file for ``name``; clipkit never downloads at run time.
    pretrained: Optional[str] = field(default=None, metadata=PATH)
    # Start from these weights (a clipkit run or checkpoint dir, an exported open_clip folder, or a .safetensors
    # state dict), e.g. to continue pretraining. Ignored once the run has its own checkpoint to resume from.
    init_from: Optional[str] = field(default=None, metadata=PATH)
    # Activation checkpointing in both towers: less activation memory for about a third more compute.
    grad_checkpointing: bool = False
    # FLIP-style patch dropout: the fraction of image patches dropped in training (0 = off; eval sees all).
    patch_dropout: float = 0.0
    # Initial temperature log(t) and bias; None = open_clip's defaults (log(1/0.07), no bias). SigLIP: log(10), -10.
    init_logit_scale: Optional[float] = None
    # (the bias: SigLIP only; None = no bias)
    init_logit_bias: Optional[float] = None

    def validate(self, prefix: str = "model") -> None:
        """Names, files and ranges; builds nothing and does not import open_clip (fast)."""
        require(f"{prefix}.patch_dropout", self.patch_dropout, 0 <= self.patch_dropout < 1, "must be in [0, 1)")
        if self.config is not None:
            require(f"{prefix}.config", self.config, Path(self.config).expanduser().is_file(), "file not found")
        elif self.name.startswith("hf-hub:"):
            raise ConfigError(
                f"{prefix}.name", self.name, "hub models need the network; clipkit loads models offline only"
            )
        elif self.name not in known_model_names():
            raise ConfigError(
                f"{prefix}.name",
                self.name,
                "unknown open_clip model (see `python -c 'import open_clip; "
                "print(open_clip.list_models())'`, or pass model.config=FILE.json)",
            )
        if self.init_from is not None:
            path = Path(self.init_from).expanduser()
            require(f"{prefix}.init_from", self.init_from, path.exists(), "path not found")
            if path.is_file() and path.suffix != ".safetensors":
                raise ConfigError(
                    f"{prefix}.init_from",
                    self.init_from,
                    "expects safetensors, a run/checkpoint dir or an "
                    "open_clip export; for open_clip .pt/.bin weights use model.pretrained",
                )
        if self.pretrained is not None and not Path(self.pretrained).expanduser().is_file():
            raise ConfigError(
                f"{prefix}.pretrained",
                self.pretrained,
                "not a local file: clipkit loads weights offline only; download the weights and pass their path",
            )


def known_model_names() -> set[str]:
    """open_clip's bundled config names plus clipkit's shipped ones, without importing open_clip (fast)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(loc) / "model_configs" for loc in (spec.submodule_search_locations or [])] if spec else []
    dirs.append(SHIPPED_CONFIGS)
    return {p.stem for d in dirs for p in d.glob("*.json")}


SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
_registered = False


def _register_shipped() -> None:
    import open_clip  # (imported here: ModelConfig's validation must not pay for it)

    global _registered
    if not _registered:
        open_clip.add_model_config(SHIPPED_CONFIGS)
        _registered = True


def is_known_model(name: str) -> bool:
    import open_clip

    _register_shipped()
    return name in open_clip.list_models()


def resolve_name(cfg: ModelConfig) -> str:
    """The open_clip model name for ``cfg``, registering ``cfg.config`` (under its file stem) if given."""
    import open_clip

    _register_shipped()
    if cfg.config:
        path = Path(cfg.config).expanduser()
        open_clip.add_model_config(path)
        return path.stem
    return cfg.name


def model_config(cfg: ModelConfig) -> dict:
    import open_clip

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
    import open_clip

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
    import open_clip

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
