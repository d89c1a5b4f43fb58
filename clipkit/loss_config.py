"""The loss component's config (``loss.*``): the contrastive objective, its blockwise form, the CoCa weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from clipkit.errors import Choice, ConfigError, require


class LossName(Choice):
    infonce = "infonce"  # softmax, CLIP
    siglip = "siglip"  # sigmoid; needs model.init_logit_bias (see conf/loss/siglip.yaml)


class InfoNCEImpl(Choice):
    gathered = "gathered"  # B x N logits
    tiled = "tiled"  # blockwise, memory O(B x chunk)


@dataclass
class LossConfig:
    # The contrastive objective: CLIP's InfoNCE or SigLIP's pairwise sigmoid (use loss=siglip).
    name: LossName = LossName.infonce
    # InfoNCE only: how the logits are computed.
    impl: InfoNCEImpl = InfoNCEImpl.gathered
    # Columns per block for tiled InfoNCE and SigLIP: ``auto`` or a positive integer.
    chunk_size: str = "auto"
    # CoCa models (coca_*, clipkit-coca-tiny) only: the captioning term's weight; None = open_clip's default, 2.
    caption_weight: Optional[float] = None
    # The contrastive term's weight (with CoCa, 0 trains the captioner alone).
    contrastive_weight: float = 1.0
    # Image-text matching (BLIP's ITM): the weight of a fusion head's matching term on each pair and on hard
    # negatives drawn from the global batch's similarities; 0 = off (no head). Eval then re-ranks retrieval.
    itm_weight: float = 0.0
    # The ITM fusion head's hidden width; 0 = the embedding width.
    itm_width: int = 0

    @property
    def itm_head(self) -> Optional[int]:
        """The ITM head's width for ``model.build_for_training``: None = no head, 0 = the embedding width."""
        return self.itm_width if self.itm_weight > 0 else None

    def validate(self, prefix: str = "loss") -> None:
        if self.caption_weight is not None:
            require(f"{prefix}.caption_weight", self.caption_weight, self.caption_weight >= 0, "must be >= 0")
        require(f"{prefix}.contrastive_weight", self.contrastive_weight, self.contrastive_weight >= 0, "must be >= 0")
        require(f"{prefix}.itm_weight", self.itm_weight, self.itm_weight >= 0, "must be >= 0 (0 = off)")
        require(f"{prefix}.itm_width", self.itm_width, self.itm_width >= 0, "must be >= 0 (0 = the embedding width)")
        chunk = self.chunk_size
        if chunk != "auto" and not (chunk.isdigit() and int(chunk) > 0):
            raise ConfigError(f"{prefix}.chunk_size", chunk, "must be 'auto' or a positive integer")
        if self.name == LossName.siglip and self.impl != InfoNCEImpl.gathered:
            raise ConfigError(f"{prefix}.impl", self.impl.value, "applies to InfoNCE only; SigLIP is always blockwise")
