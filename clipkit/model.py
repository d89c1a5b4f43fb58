"""Building the dual encoder through open_clip: by name, from a shipped config, or from a user JSON.

clipkit ships small configs (``clipkit/model_configs/*.json``) registered with ``open_clip.add_model_config``.
Weights are only ever read from local files: there is no network at run time on many clusters, and a hub
request would stall for a minute before failing.
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from clipkit import checkpoint as ckpt
from clipkit import itm, lora
from clipkit.errors import ConfigError
from clipkit.model_config import SHIPPED_CONFIGS, ModelConfig, Towers
from clipkit.optim import tower_of

_registered = False


def _register_shipped() -> None:

    global _registered
    if not _registered:
        open_clip.add_model_config(SHIPPED_CONFIGS)
        _registered = True


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


def build_for_training(
    cfg: ModelConfig, device: torch.device | str, itm_head: int | None = None
) -> tuple[Built, list[str]]:
    """The model as a training run starts it, from the RNG state the caller seeded: built, the ITM head added
    (``itm_head``: its width, 0 = the embedding width; None = none; ``loss.itm_head``), ``model.init_from`` loaded
    (a resume later overwrites what it saved), then the locks and the LoRA adapters applied, before any
    engine sees the parameters. Also what ``clipkit eval`` rebuilds under a LoRA checkpoint's adapters. Returns
    the model and its lines for the run log."""
    built = build(cfg, device)
    said = [add_itm_head(built.model, cfg, itm_head)]
    if cfg.init_from:
        said.append(load_init(built.model, cfg, device))
    said += [apply_locks(built.model, cfg), lora.apply(built.model, cfg.lora)]
    return built, [line for line in said if line]


def add_itm_head(model: torch.nn.Module, cfg: ModelConfig, width: int | None) -> str | None:
    """The ITM fusion head (``clipkit/itm.py``) on the model's embeddings, when ``width`` is not None."""
    if width is None:
        return None
    dim = int(model_config(cfg)["embed_dim"])
    return itm.attach(model, dim, width or dim)


def init_uninitialized(model: torch.nn.Module) -> None:
    """What open_clip leaves uninitialised, initialised from the seeded RNG. open_clip 3.3's CoCa caption decoder
    (``MultimodalTransformer``) allocates its vocabulary projection with ``torch.empty`` and never runs its
    ``init_parameters`` (which would fail: it reads ``self.transformer``), so a fresh CoCa's projection is whatever
    the allocator returns: zeros for a fresh page, leftovers (1e28, NaN) from reused memory, and not the same on
    two ranks. clipkit applies the init that method meant: normal, std = width ** -0.5."""
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if projection is not None:
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=decoder.width**-0.5)


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


def load_init(model: torch.nn.Module, cfg: ModelConfig, device: torch.device | str) -> str | None:
    """Loads ``model.init_from`` into the towers ``model.init_towers`` names (the temperature and bias with
    ``both`` only); every key of those towers must be in the file. With ``both``, an ITM head of the file's of
    the same shape is loaded too (returns a line saying so); else the model's keeps its fresh initialisation."""
    try:
        weights = ckpt.load_tensors(ckpt.weights_file(Path(cfg.init_from).expanduser()), device)
    except (OSError, ValueError, RuntimeError) as err:  # not safetensors, a folder that is no run, ...
        reason = f"holds no weights clipkit can read: {_short(err)}"
        raise ConfigError("model.init_from", cfg.init_from, reason) from None
    (_, ours), (weights, theirs) = itm.split(model.state_dict()), itm.split(weights)
    if cfg.init_towers == Towers.both:
        same = bool(ours) and theirs.keys() == ours.keys() and all(theirs[k].shape == v.shape for k, v in ours.items())
        load_weights(model, {**weights, **(theirs if same else ours)}, "model.init_from", cfg.init_from)
        return f"ITM head loaded from model.init_from={cfg.init_from}" if same else None
    wanted = {k for k in model.state_dict() if tower_of(k) == cfg.init_towers}
    missing = sorted(wanted - weights.keys())
    if missing:
        raise ConfigError("model.init_from", cfg.init_from, f"has no {cfg.init_towers} tower weights {missing[:3]}")
    load_weights(model, {k: weights[k] for k in wanted}, "model.init_from", cfg.init_from, strict=False)
    return None


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
    return [module for name, module in model.named_children() if tower_of(name + ".") == tower]


def _hold_eval(module: torch.nn.Module) -> None:
    """``module`` (and everything under it) stays in eval mode whatever ``model.train()`` asks."""
    module.train = types.MethodType(lambda self, mode=True: torch.nn.Module.train(self, False), module)
    module.train()


def apply_locks(model: torch.nn.Module, cfg: ModelConfig) -> str | None:
    """Freezes what ``model.lock_*`` asks for through open_clip's own ``lock_image_tower`` / ``lock_text_tower``
    (every tower type it builds: ViT, ModifiedResNet, timm, HF); clipkit adds the norm freeze for every tower and
    eval mode for fully locked towers. Frozen parameters get no gradient, hence no optimizer state and no weight
    decay (``optim.param_groups`` takes trainable parameters only). Returns a line for the run log."""
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
