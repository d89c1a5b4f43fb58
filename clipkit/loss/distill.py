"""Distillation from a teacher (``distill.*``): the contrastive loss plus ``weight`` x a term that pulls the
student toward the teacher, with the same contract as the other losses (each rank's local rows against the
global batch's columns, the mean over local rows; averaging the ranks' gradients gives the global batch's).

``kind="logits"`` (open_clip's DistillClipLoss is the reference): per direction, the cross-entropy between the
teacher's softmax and the student's log-softmax over the global batch's columns, each model at its own
temperature: ``-sum_j softmax(t_i)_j log softmax(s_i)_j``, averaged over rows and over both directions.
``impl="gathered"`` builds both B x N logit matrices; ``impl="tiled"`` neither, using
``-sum_j p_ij log q_ij = lse(s_i) - scale * rows_i . (sum_j p_ij cols_j)``: the log-sum-exp of the student's
row (chunked, ``_TiledLogSumExp``) and the teacher-weighted sum of the student's columns (chunked, recomputed
in backward, ``_TeacherWeightedSum``), so memory stays O(B x chunk) for the teacher too.

``kind="features"``: the cosine distance between each sample's student and teacher embeddings (per sample, no
gather; the embedding widths must match).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.distributed import all_gather_with_grad
from clipkit.loss.contrastive import _chunks, _compute_dtype, _TiledLogSumExp, auto_chunk_size, chunked_logsumexp


class _TeacherWeightedSum(torch.autograd.Function):
    """P_BD[i] = sum_j softmax_j(t_scale * t_rows[i] . t_cols[j]) * cols[j], chunk by chunk; the gradient flows to
    ``cols`` only (the teacher's inputs carry none), with the weights recomputed in backward."""

    @staticmethod
    def forward(ctx, t_rows_BD, t_cols_ND, t_scale, cols_ND, chunk: int):
        lse_B = chunked_logsumexp(t_rows_BD, t_cols_ND, t_scale, chunk)
        out_BD = cols_ND.new_zeros((t_rows_BD.shape[0], cols_ND.shape[1]))
        for a, b in _chunks(t_cols_ND.shape[0], chunk):
            out_BD += torch.exp(t_scale * (t_rows_BD @ t_cols_ND[a:b].T) - lse_B[:, None]) @ cols_ND[a:b]
        ctx.save_for_backward(t_rows_BD, t_cols_ND, t_scale, lse_B)
        ctx.chunk, ctx.num_cols = chunk, cols_ND.shape
        return out_BD

    @staticmethod
    def backward(ctx, grad_BD):
        t_rows_BD, t_cols_ND, t_scale, lse_B = ctx.saved_tensors
        grad_cols = grad_BD.new_zeros(ctx.num_cols)
        for a, b in _chunks(t_cols_ND.shape[0], ctx.chunk):
            weights_BC = torch.exp(t_scale * (t_rows_BD @ t_cols_ND[a:b].T) - lse_B[:, None])
            grad_cols[a:b] = weights_BC.T @ grad_BD
        return None, None, None, grad_cols, None


def _soft_cross_entropy(rows_BD, cols_ND, scale, t_rows_BD, t_cols_ND, t_scale, impl: str, chunk) -> torch.Tensor:
    """mean_i -sum_j softmax(t_scale * t_rows_i . t_cols_j) log softmax(scale * rows_i . cols_j)."""
    if impl == "gathered":
        student_BN = scale * rows_BD @ cols_ND.T
        teacher_BN = t_scale * t_rows_BD @ t_cols_ND.T
        return -(teacher_BN.softmax(dim=1) * student_BN.log_softmax(dim=1)).sum(dim=1).mean()
    chunk = auto_chunk_size(rows_BD.shape[0], cols_ND.shape[0]) if chunk == "auto" else int(chunk)
    lse_B = _TiledLogSumExp.apply(rows_BD, cols_ND, scale, chunk)
    weighted_BD = _TeacherWeightedSum.apply(t_rows_BD, t_cols_ND, t_scale, cols_ND, chunk)
    return (lse_B - scale * (rows_BD * weighted_BD).sum(dim=1)).mean()


class DistillLoss(torch.nn.Module):
    """``base(img, txt, scale, bias) + weight * distill(student, teacher)``; ``teacher`` is the teacher's output
    for the same samples (``image_features``, ``text_features``, ``logit_scale``; no gradient)."""

    def __init__(self, base: torch.nn.Module, weight: float, kind: str = "logits", impl: str = "gathered",
                 chunk_size: int | str = "auto"):  # fmt: skip
        super().__init__()
        if kind not in ("logits", "features"):
            raise ValueError(f"unknown distillation kind {kind!r}")
        self.base, self.weight, self.kind, self.impl, self.chunk_size = base, weight, kind, impl, chunk_size

    def forward(self, img_emb_BD, txt_emb_BD, logit_scale, logit_bias=None, teacher: dict | None = None):
        if teacher is None:
            raise ValueError("DistillLoss needs the teacher's outputs for the same samples")
        loss = self.base(img_emb_BD, txt_emb_BD, logit_scale, logit_bias)
        return loss + self.weight * self.term(img_emb_BD, txt_emb_BD, logit_scale, teacher)

    def term(self, img_emb_BD, txt_emb_BD, logit_scale, teacher: dict) -> torch.Tensor:
        dtype = _compute_dtype(img_emb_BD)
        img_BD, txt_BD, scale = img_emb_BD.to(dtype), txt_emb_BD.to(dtype), logit_scale.to(dtype)
        t_img_BD = teacher["image_features"].detach().to(dtype)
        t_txt_BD = teacher["text_features"].detach().to(dtype)
        if self.kind == "features":
            return (
                (1 - F.cosine_similarity(img_BD, t_img_BD, dim=1)).mean()
                + (1 - F.cosine_similarity(txt_BD, t_txt_BD, dim=1)).mean()
            ) / 2
        t_scale = teacher["logit_scale"].detach().to(dtype)
        all_img_ND, all_txt_ND = all_gather_with_grad(img_BD), all_gather_with_grad(txt_BD)
        all_t_img_ND, all_t_txt_ND = all_gather_with_grad(t_img_BD), all_gather_with_grad(t_txt_BD)
        how = (self.impl, self.chunk_size)
        i2t = _soft_cross_entropy(img_BD, all_txt_ND, scale, t_img_BD, all_t_txt_ND, t_scale, *how)
        t2i = _soft_cross_entropy(txt_BD, all_img_ND, scale, t_txt_BD, all_t_img_ND, t_scale, *how)
        return (i2t + t2i) / 2
