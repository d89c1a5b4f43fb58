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

from clipkit.errors import PATH, Choice, ConfigError, require

if TYPE_CHECKING:
    import torch


class Towers(Choice):
    both = "both"
    image = "image"
    text = "text"


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
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(loc) / "model_configs" for loc in (spec.submodule_search_locations or [])] if spec else []
    return [SHIPPED_CONFIGS, *dirs]


def known_model_names() -> set[str]:
    """open_clip's bundled config names plus clipkit's shipped ones, without importing open_clip (fast)."""
    return {p.stem for d in _config_dirs() for p in d.glob("*.json")}


SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"


def config_json(cfg: ModelConfig) -> dict | None:
    """The model's open_clip config as its JSON file says, without importing open_clip (None: not found)."""
    import json

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


_registered = False


def _register_shipped() -> None:
    import open_clip  # (imported here: ModelConfig's validation must not pay for it)

    global _registered
    if not _registered:
        open_clip.add_model_config(SHIPPED_CONFIGS)
        _registered = True


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
        try:
            model = open_clip.create_model(name, pretrained=cfg.pretrained, device=device, output_dict=True, **init)
        except Exception as err:  # a pickle with code, a text file, another model's weights: one line, not a trace
            if cfg.pretrained is None:
                raise
            raise ConfigError(
                "model.pretrained", cfg.pretrained, f"cannot be loaded as {name} weights: {_short(err)}"
            ) from None
    if cfg.pretrained is None:
        init_uninitialized(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return _built(model, open_clip.get_tokenizer(name), name)


def init_uninitialized(model: torch.nn.Module) -> None:
    """What open_clip leaves uninitialised, initialised from the seeded RNG. open_clip 3.3's CoCa caption decoder
    (``MultimodalTransformer``) allocates its vocabulary projection with ``torch.empty`` and never runs its
    ``init_parameters`` (which would fail: it reads ``self.transformer``), so a fresh CoCa's projection is whatever
    the allocator returns: zeros for a fresh page, leftovers (1e28, NaN) from reused memory, and not the same on
    two ranks. clipkit applies the init that method meant: normal, std = width ** -0.5."""
    import torch

    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if projection is not None:
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=decoder.width**-0.5)


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


def load_init(model: torch.nn.Module, cfg: ModelConfig, device: torch.device | str) -> None:
    """Loads ``model.init_from`` into the towers ``model.init_towers`` names (the temperature and bias with
    ``both`` only); every key of those towers must be in the file."""
    from clipkit import checkpoint as ckpt
    from clipkit.optim import tower_of

    try:
        weights = ckpt.load_tensors(ckpt.weights_file(Path(cfg.init_from).expanduser()), device)
    except (OSError, ValueError, RuntimeError) as err:  # not safetensors, a folder that is no run, ...
        reason = f"holds no weights clipkit can read: {_short(err)}"
        raise ConfigError("model.init_from", cfg.init_from, reason) from None
    if cfg.init_towers == Towers.both:
        load_weights(model, weights, "model.init_from", cfg.init_from)
        return
    wanted = {k for k in model.state_dict() if tower_of(k) == cfg.init_towers}
    missing = sorted(wanted - weights.keys())
    if missing:
        raise ConfigError("model.init_from", cfg.init_from, f"has no {cfg.init_towers} tower weights {missing[:3]}")
    load_weights(model, {k: weights[k] for k in wanted}, "model.init_from", cfg.init_from, strict=False)


def load_weights(model: torch.nn.Module, weights: dict, key: str, source, strict: bool = True) -> None:
    """``load_state_dict``, with another architecture's weights refused in one line naming ``key=source``: how
    many keys are missing or unexpected, which shapes differ."""
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as err:
        raise ConfigError(key, str(source), f"holds weights of another model: {_short(err)}") from None


def _short(err: BaseException) -> str:
    """An exception as one short line (load_state_dict's message lists every key)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines[:3]) if lines else ""
    return f"{type(err).__name__}: {text[:300]}"


_NORMS = ("LayerNorm", "GroupNorm", "BatchNorm", "RMSNorm")


def _tower_modules(model: torch.nn.Module, tower: str) -> list[torch.nn.Module]:
    """The top-level modules that make up a tower, by ``optim.tower_of``'s rule (open_clip's ``CLIP`` keeps its
    text tower's parts at the top level)."""
    from clipkit.optim import tower_of

    return [module for name, module in model.named_children() if tower_of(name + ".") == tower]


def _hold_eval(module: torch.nn.Module) -> None:
    """``module`` (and everything under it) stays in eval mode whatever ``model.train()`` asks."""
    import types

    import torch

    module.train = types.MethodType(lambda self, mode=True: torch.nn.Module.train(self, False), module)
    module.train()


def apply_locks(model: torch.nn.Module, cfg: ModelConfig) -> str | None:
    """Freezes what ``model.lock_*`` asks for through open_clip's own ``lock_image_tower`` / ``lock_text_tower``
    (every tower type it builds: ViT, ModifiedResNet, timm, HF); clipkit adds the norm freeze for every tower and
    eval mode for fully locked towers. Frozen parameters get no gradient, hence no optimizer state and no weight
    decay (``optim.param_groups`` takes trainable parameters only). Returns a line for the run log."""
    from clipkit.optim import tower_of

    said = []
    for tower, unlocked_key in (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers")):
        if not getattr(cfg, f"lock_{tower}"):
            continue
        unlocked, norm = getattr(cfg, unlocked_key), getattr(cfg, f"lock_{tower}_norm")
        if tower == "image" and type(model.visual).__name__ == "TimmModel":
            # open_clip locks a timm trunk but never its projection head; here the head is the last group, as
            # a ViT's projection is: 0 locks the whole tower, N >= 1 leaves the head and N - 1 trunk groups.
            model.lock_image_tower(unlocked_groups=max(0, unlocked - 1), freeze_bn_stats=norm)
            model.visual.head.requires_grad_(unlocked > 0)
        elif tower == "image":  # (CoCa has no lock_image_tower: its tower's own lock is what CLIP's calls)
            model.visual.lock(unlocked_groups=unlocked, freeze_bn_stats=norm)
        elif hasattr(model, "text") and hasattr(model.text, "lock"):  # HF and CoCa text towers
            model.text.lock(unlocked, freeze_layer_norm=True)
        else:
            model.lock_text_tower(unlocked, freeze_layer_norm=True)
        modules = _tower_modules(model, tower)
        if norm:
            for module in modules:
                for sub in module.modules():
                    if any(n in type(sub).__name__ for n in _NORMS):
                        sub.requires_grad_(False)
                        _hold_eval(sub)
        if not unlocked and not cfg.lock_train_mode:
            for module in modules:
                _hold_eval(module)
        params = [p for name, p in model.named_parameters() if tower_of(name) == tower]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        mode = "eval mode" if not unlocked and not cfg.lock_train_mode else "train mode"
        said.append(
            f"{tower} tower locked ({trainable / 1e6:.2f}M of {sum(p.numel() for p in params) / 1e6:.2f}M params "
            f"trainable, {mode})"
        )
    if not said:
        return None
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return "; ".join(said) + f"; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M params trainable"
