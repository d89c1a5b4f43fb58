"""Contrastive losses behind one interface: ``loss(img_emb_BD, txt_emb_BD, logit_scale, logit_bias=None)``.

Inputs are the rank's local, L2-normalised embeddings and the temperature as the multiplier open_clip returns
(``logit_scale = t.exp()``). The returned loss is the mean over the local rows, so that averaging the ranks'
gradients (what DDP does) gives the gradient of the global-batch loss. The log-sum-exp runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.distributed import all_gather_with_grad, rank_and_world


class InfoNCELoss(torch.nn.Module):
    """Symmetric InfoNCE: local rows against the global batch's columns, labels offset by rank.

    Image->text uses the B local images against all W*B gathered texts; text->image the B local texts against
    all gathered images. Gathers are autograd-aware (their backward sums every rank's contribution), so the
    encoder gradients are exact, unlike a plain all_gather.
    """

    def forward(
        self,
        img_emb_BD: torch.Tensor,
        txt_emb_BD: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, world = rank_and_world()
        img_emb_BD, txt_emb_BD = img_emb_BD.float(), txt_emb_BD.float()
        all_img_ND = all_gather_with_grad(img_emb_BD)
        all_txt_ND = all_gather_with_grad(txt_emb_BD)
        logits_i2t_BN = logit_scale * img_emb_BD @ all_txt_ND.T
        logits_t2i_BN = logit_scale * txt_emb_BD @ all_img_ND.T
        if logit_bias is not None:
            logits_i2t_BN, logits_t2i_BN = logits_i2t_BN + logit_bias, logits_t2i_BN + logit_bias
        labels_B = torch.arange(img_emb_BD.shape[0], device=img_emb_BD.device) + rank * img_emb_BD.shape[0]
        return (F.cross_entropy(logits_i2t_BN, labels_B) + F.cross_entropy(logits_t2i_BN, labels_B)) / 2


def build_loss(name: str) -> torch.nn.Module:
    if name == "infonce":
        return InfoNCELoss()
    raise ValueError(f"unknown loss {name!r}")
