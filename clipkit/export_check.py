"""What every export shares: the fixed probe batch an export must reproduce, the reference embeddings, the
comparison and its tolerance, and the model config an export writes."""

from __future__ import annotations

import torch

from clipkit.config import RootConfig
from clipkit.errors import UserError
from clipkit.model import Built, model_config


class ExportError(UserError, ValueError):
    """An export that cannot be written, or that its consumer does not load as the checkpoint computes."""

    kind = "export error"


MAX_ABS_DIFF = 1e-4  # fp32 embeddings, before normalisation


PROBE_CAPTIONS = [f"a photo of thing number {i}" for i in range(4)]


def probe_inputs(built: Built) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch (4 images, 4 captions) on which an export must reproduce the checkpoint's embeddings."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(PROBE_CAPTIONS), 3, built.image_size, built.image_size, generator=g)
    return images, built.tokenizer(PROBE_CAPTIONS)


@torch.no_grad()
def reference(built: Built, images, text) -> tuple[torch.Tensor, torch.Tensor]:
    built.model.eval()
    return built.model.encode_image(images), built.model.encode_text(text)


def open_clip_model_cfg(cfg: RootConfig) -> dict:
    model_cfg = dict(model_config(cfg.model))
    for key in ("init_logit_scale", "init_logit_bias"):
        if getattr(cfg.model, key) is not None:
            model_cfg[key] = getattr(cfg.model, key)
    return model_cfg


def check(fmt: str, ref_img, ref_txt, got_img, got_txt) -> dict:
    diff = {
        "image_max_abs_diff": (ref_img - got_img).abs().max().item(),
        "text_max_abs_diff": (ref_txt - got_txt).abs().max().item(),
    }
    if max(diff.values()) > MAX_ABS_DIFF:
        raise ExportError(f"{fmt} export does not reproduce the checkpoint's embeddings: {diff}")
    return {"format": fmt, **diff, "tolerance": MAX_ABS_DIFF}
