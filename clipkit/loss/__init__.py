"""The loss component: ``build_loss`` and ``build_caption_loss`` (configured in ``loss_config.py``, ``loss.*``); the
losses themselves are in ``contrastive.py`` and, for CoCa models, ``caption.py``."""

from __future__ import annotations

from clipkit.loss.caption import CaptionLoss
from clipkit.loss.contrastive import InfoNCELoss, SigLIPLoss, Weighted
from clipkit.model_config import is_coca

__all__ = ["InfoNCELoss", "SigLIPLoss", "build_caption_loss", "build_loss"]


def build_loss(name: str, impl: str = "gathered", chunk_size: int | str = "auto", weight: float = 1.0):
    """The contrastive loss, times ``weight`` unless it is 1."""
    if name == "infonce":
        loss = InfoNCELoss(impl, chunk_size)
    elif name == "siglip":
        loss = SigLIPLoss(chunk_size)
    else:
        raise ValueError(f"unknown loss {name!r}")
    return loss if weight == 1 else Weighted(loss, weight)


def build_caption_loss(cfg, model):
    """CoCa's captioning term for ``cfg`` (a ``RootConfig``) when its model is a CoCa, else None."""
    if not is_coca(cfg.model):
        return None
    weight = 2.0 if cfg.loss.caption_weight is None else cfg.loss.caption_weight
    return CaptionLoss(weight, getattr(model, "pad_id", 0))
