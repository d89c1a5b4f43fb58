"""The model component's config (``model.*``) and what validating it needs: the names of the models open_clip
and clipkit ship, and a model's open_clip JSON, found without importing open_clip (a bad config fails in a fraction
of a second)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from clipkit.errors import PATH, Choice, ConfigError, require

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
FROM_LORA_RUN = (
    "is a LoRA run: its checkpoints hold the adapters only; export it (clipkit export checkpoint=RUN "
    "format=open_clip out=DIR merges them into the weights) and start from DIR"
)


def is_lora_run(path: Path) -> bool:
    """A LoRA run dir, one of its checkpoints, or a weights file in one (``lora.json`` marks its checkpoints)."""
    folder = path if path.is_dir() else path.parent
    return (folder / "lora.json").is_file() or any(folder.glob("checkpoints/step_*/lora.json"))


class Towers(Choice):
    both = "both"
    image = "image"
    text = "text"


class LoraTarget(Choice):
    attn = "attn"  # the attention's input (query/key/value) and output projections
    mlp = "mlp"  # the MLP's two linear layers


@dataclass
class LoraConfig:
    """``model.lora.*``: low-rank adapters (LoRA, through peft) on the transformer blocks of pretrained towers. The
    adapted towers' own weights stay frozen and are not saved in checkpoints (they come from ``model.pretrained``
    or ``model.init_from`` again, checked by digest); ``clipkit export`` merges the adapters into the weights."""

    # The adapters' rank r; 0 = no LoRA.
    rank: int = 0
    # The scale of the adapters' update is alpha / rank.
    alpha: float = 16.0
    # Dropout on the adapters' input (training only).
    dropout: float = 0.0
    # Which towers get adapters; their other weights freeze. A tower without adapters trains as it would without
    # LoRA (or stays locked: model.lock_image / lock_text).
    towers: Towers = Towers.both
    # Which layers of each block: attn (query/key/value and output projections), mlp (both linear layers).
    targets: list[LoraTarget] = field(default_factory=lambda: [LoraTarget.attn, LoraTarget.mlp])
    # Adapters on the last N blocks of each adapted tower only; 0 = every block.
    blocks: int = 0

    @property
    def on(self) -> bool:
        return self.rank > 0

    def adapts(self, tower: str) -> bool:
        return self.on and tower in (Towers.image, Towers.text) and self.towers in (Towers.both, tower)

    def validate(self, prefix: str = "model.lora") -> None:
        require(f"{prefix}.rank", self.rank, self.rank >= 0, "must be >= 0 (0 = no LoRA)")
        require(f"{prefix}.alpha", self.alpha, self.alpha > 0, "must be > 0")
        require(f"{prefix}.dropout", self.dropout, 0 <= self.dropout < 1, "must be in [0, 1)")
        require(f"{prefix}.blocks", self.blocks, self.blocks >= 0, "must be >= 0 (0 = every block)")
        targets = [str(t) for t in self.targets]
        require(f"{prefix}.targets", targets, bool(targets), "must name at least one of attn, mlp")
        require(f"{prefix}.targets", targets, len(set(targets)) == len(targets), "names a layer twice")


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
    # Which towers model.init_from loads (the others keep their fresh initialisation), e.g. `image` for LiT.
    init_towers: Towers = Towers.both
    # Lock (freeze) the image tower, as in LiT: no gradient, no optimizer state, no weight decay.
    lock_image: bool = False
    # Leave the last N layer groups of the locked image tower trainable (open_clip's groups: the embeddings, each
    # block, the last block with the final norm, the projection; timm towers: timm's groups, then the head).
    lock_image_unlocked_groups: int = 0
    # Keep the locked image tower's norm layers frozen in its unlocked groups too (BatchNorm: statistics too).
    lock_image_norm: bool = False
    # Lock (freeze) the text tower.
    lock_text: bool = False
    # Leave the last N layer groups of the locked text tower trainable (the embeddings, each block, the last block
    # with the final norm, the projection).
    lock_text_unlocked_layers: int = 0
    # Keep the locked text tower's norm layers frozen in its unlocked layers too.
    lock_text_norm: bool = False
    # A fully locked tower runs in eval mode (no dropout or patch dropout, frozen norm statistics); true keeps it
    # in train mode like the rest of the model.
    lock_train_mode: bool = False
    # Activation checkpointing in both towers: less activation memory for about a third more compute.
    grad_checkpointing: bool = False
    # FLIP-style patch dropout: the fraction of image patches dropped in training (0 = off; eval sees all).
    patch_dropout: float = 0.0
    # Initial temperature log(t) and bias; None = open_clip's defaults (log(1/0.07), no bias). SigLIP: log(10), -10.
    init_logit_scale: Optional[float] = None
    # (the bias: SigLIP only; None = no bias)
    init_logit_bias: Optional[float] = None
    # Low-rank adapters on pretrained towers (model.lora.rank=8 turns them on); see LoraConfig.
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, prefix: str = "model") -> None:
        """Names, files and ranges; builds nothing and does not import open_clip (fast)."""
        require(f"{prefix}.patch_dropout", self.patch_dropout, 0 <= self.patch_dropout < 1, "must be in [0, 1)")
        for tower, unlocked in (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers")):
            n = getattr(self, unlocked)
            require(f"{prefix}.{unlocked}", n, n >= 0, "must be >= 0")
            for key in (unlocked, f"lock_{tower}_norm"):
                if getattr(self, key) and not getattr(self, f"lock_{tower}"):
                    raise ConfigError(f"{prefix}.{key}", getattr(self, key), f"needs {prefix}.lock_{tower}=true")
        if (
            self.lock_image
            and self.lock_text
            and not (self.lock_image_unlocked_groups or self.lock_text_unlocked_layers)
        ):
            raise ConfigError(f"{prefix}.lock_text", True, "both towers fully locked: only the temperature would train")
        self.lora.validate(f"{prefix}.lora")
        if self.lora.on:
            if importlib.util.find_spec("peft") is None:
                raise ConfigError(f"{prefix}.lora.rank", self.lora.rank, "needs peft: pip install 'clipkit[lora]'")
            if self.pretrained is None and self.init_from is None:
                raise ConfigError(
                    f"{prefix}.lora.rank",
                    self.lora.rank,
                    f"adapts pretrained weights: give {prefix}.pretrained=FILE or {prefix}.init_from=RUN_OR_EXPORT",
                )
            for tower in ("image", "text"):
                if self.lora.adapts(tower) and getattr(self, f"lock_{tower}"):
                    raise ConfigError(
                        f"{prefix}.lock_{tower}",
                        True,
                        f"the {tower} tower has LoRA adapters ({prefix}.lora.towers={self.lora.towers}), which "
                        f"freeze its weights already; lock the other tower only, or set {prefix}.lora.towers",
                    )
        if self.init_towers != Towers.both and self.init_from is None:
            raise ConfigError(f"{prefix}.init_towers", self.init_towers, f"needs {prefix}.init_from")
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
            if is_lora_run(path):
                raise ConfigError(f"{prefix}.init_from", self.init_from, FROM_LORA_RUN)
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


def _config_dirs() -> list[Path]:
    """clipkit's shipped model configs, then open_clip's bundled ones (found without importing open_clip: fast)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(loc) / "model_configs" for loc in (spec.submodule_search_locations or [])] if spec else []
    return [SHIPPED_CONFIGS, *dirs]


def known_model_names() -> set[str]:
    """open_clip's bundled config names plus clipkit's shipped ones, without importing open_clip (fast)."""
    return {p.stem for d in _config_dirs() for p in d.glob("*.json")}


def config_json(cfg: ModelConfig) -> dict | None:
    """The model's open_clip config as its JSON file says, without importing open_clip (None: not found)."""
    if cfg.config:
        path = Path(cfg.config).expanduser()
    else:
        found = [d / f"{cfg.name}.json" for d in _config_dirs() if (d / f"{cfg.name}.json").is_file()]
        if not found:
            return None
        path = found[0]
    return json.loads(path.read_text())


def is_coca(cfg: ModelConfig) -> bool:
    """A CoCa model (a captioning decoder beside the two towers: open_clip's ``multimodal_cfg``)."""
    return "multimodal_cfg" in (config_json(cfg) or {})
