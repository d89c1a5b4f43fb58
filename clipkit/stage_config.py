"""``train.stages``: a run in phases of their own image size and patch dropout (CLIPA's and FLIP's recipe: most
steps on small images or with half the patches dropped, then a short phase at full size). Parsing and checks
only; nothing is built and open_clip is not imported (the model's patch and image size come from its JSON).

An entry is ``STEPS:SIZE`` or ``STEPS:SIZE:PATCH_DROPOUT``: that many steps at that image side in pixels, with
that fraction of patches dropped (default: ``model.patch_dropout``). ``STEPS`` is a count, or a percentage of
``train.steps`` (``90%``, rounded to a whole step, at least 1), and the last entry's may be ``rest``: whatever
``train.steps`` leaves. Otherwise the steps must add up to ``train.steps``. The learning-rate schedule spans the
whole run, across the stages, and like it, percentages follow ``train.steps`` when a resumed run raises it."""

from __future__ import annotations

from dataclasses import dataclass

from clipkit.errors import ConfigError
from clipkit.model_config import ModelConfig, config_json

REST = "rest"
KEY = "train.stages"


@dataclass(frozen=True)
class Stage:
    index: int  # 0-based
    start: int  # the steps before it: it trains steps start + 1 .. end
    end: int
    image_size: int
    patch_dropout: float

    def grid(self, patch_size: int) -> int:
        return self.image_size // patch_size

    def describe(self, count: int) -> str:
        dropout = f", patch dropout {self.patch_dropout:g}" if self.patch_dropout else ""
        return f"stage {self.index + 1} of {count}: steps {self.start + 1}-{self.end} at {self.image_size} px{dropout}"


def vit_geometry(model: ModelConfig) -> tuple[int, int] | None:
    """(image size, patch size) of an open_clip ViT image tower with a learned position embedding, from the
    model's JSON; None for towers stages cannot resize (timm, ResNet, fixed sin-cos embeddings)."""
    vision = (config_json(model) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int):
        return None
    if vision.get("pos_embed_type", "learnable") != "learnable":
        return None
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):  # (non-square images or patches)
        return None
    return size, patch


def parse_stages(entries: list[str], total_steps: int, model: ModelConfig) -> list[Stage]:
    """``train.stages`` as Stages covering steps 1..``total_steps``; raises ``ConfigError`` naming the field."""
    if not entries:
        return []
    geometry = vit_geometry(model)
    if geometry is None:
        raise ConfigError(KEY, list(entries), f"needs an open_clip ViT image tower with a learned position "
                          f"embedding; {model.config or model.name} has another kind")  # fmt: skip
    native, patch = geometry
    stages, start = [], 0
    for i, entry in enumerate(entries):
        parts = str(entry).split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(KEY, list(entries), f"entry {entry!r} is not STEPS:SIZE or STEPS:SIZE:PATCH_DROPOUT")
        steps_text, size_text, *dropout_text = parts
        last = i == len(entries) - 1
        if steps_text == REST:
            if not last:
                raise ConfigError(KEY, list(entries), f"only the last entry may run the {REST} of train.steps")
            steps = total_steps - start
            if steps < 1:
                raise ConfigError(KEY, list(entries), f"the stages before the last take all {total_steps} train.steps")
        elif steps_text.endswith("%"):
            steps = max(1, round(_number(float, steps_text[:-1], entry, entries) / 100 * total_steps))
        else:
            steps = _number(int, steps_text, entry, entries)
            if steps < 1:
                raise ConfigError(KEY, list(entries), f"entry {entry!r}: STEPS must be >= 1")
        size = _number(int, size_text, entry, entries)
        if size < patch or size % patch:
            raise ConfigError(KEY, list(entries), f"entry {entry!r}: SIZE must be a multiple of the model's patch "
                              f"size {patch} (its own size is {native})")  # fmt: skip
        dropout = _number(float, dropout_text[0], entry, entries) if dropout_text else model.patch_dropout
        if not 0 <= dropout < 1:
            raise ConfigError(KEY, list(entries), f"entry {entry!r}: PATCH_DROPOUT must be in [0, 1)")
        stages.append(Stage(i, start, start + steps, size, dropout))
        start += steps
    if start != total_steps:
        raise ConfigError(KEY, list(entries), f"the stages' steps add up to {start}, train.steps is {total_steps} "
                          f"(make the last entry's STEPS {REST} to take what is left)")  # fmt: skip
    return stages


def _number(kind: type, text: str, entry: str, entries: list[str]):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(KEY, list(entries), f"entry {entry!r}: {text!r} is not a number") from None
