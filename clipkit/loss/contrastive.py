"""Contrastive losses behind one interface: ``loss(img_emb_BD, txt_emb_BD, logit_scale, logit_bias=None)``.

Inputs are the rank's local, L2-normalised embeddings and the temperature as the multiplier open_clip returns
(``logit_scale = t.exp()``), so logits are ``logit_scale * img @ txt.T (+ logit_bias)``. Under torch.distributed
the losses gather the other ranks' embeddings themselves, with a gather whose backward sums every rank's
contribution. Each rank returns the mean over its *local* rows, so averaging the ranks' gradients (what DDP
does) gives exactly the gradient of the loss over the global batch. All similarity math runs in fp32 (or the
inputs' dtype if wider).

Variants
  InfoNCELoss(impl="gathered")  B x N logits per direction (N = W*B), one cross-entropy each.
  InfoNCELoss(impl="tiled")     never materialises logits: blockwise log-sum-exp over column chunks, recomputed
                                in backward (custom autograd); O(B x chunk) memory.
  SigLIPLoss                    sigmoid loss over local images x all texts, processed in column chunks and
                                recomputed in backward: O(B x chunk) memory, not O(B x N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.distributed import all_gather_with_grad, rank_and_world

# Memory budget for one chunk of logits (and its ~3 same-sized temporaries) when chunk_size="auto".
AUTO_CHUNK_BYTES = 64 * 2**20


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def auto_chunk_size(rows: int, cols: int, budget_bytes: int = AUTO_CHUNK_BYTES) -> int:
    """Largest column chunk whose B x chunk fp32 logits (x4 temporaries) fit the budget; at least 128."""
    return int(max(128, min(cols, budget_bytes // (16 * max(rows, 1)))))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def chunked_logsumexp(rows_BD, cols_ND, scale, chunk: int) -> torch.Tensor:
    """lse_B[i] = logsumexp_j(scale * rows_BD[i] . cols_ND[j]), ``chunk`` columns at a time (running max and sum)."""
    B = rows_BD.shape[0]
    run_max = rows_BD.new_full((B,), -torch.inf)
    run_sum = rows_BD.new_zeros((B,))
    for a, b in _chunks(cols_ND.shape[0], chunk):
        logits_BC = scale * (rows_BD @ cols_ND[a:b].T)
        new_max = torch.maximum(run_max, logits_BC.max(dim=1).values)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits_BC - new_max[:, None]).sum(dim=1)
        run_max = new_max
    return run_max + torch.log(run_sum)


class _TiledLogSumExp(torch.autograd.Function):
    """lse_B[i] = logsumexp_j(scale * rows_BD[i] . cols_ND[j]), computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, rows_BD, cols_ND, scale, chunk: int):
        lse_B = chunked_logsumexp(rows_BD, cols_ND, scale, chunk)
        ctx.save_for_backward(rows_BD, cols_ND, scale, lse_B)
        ctx.chunk = chunk
        return lse_B

    @staticmethod
    def backward(ctx, grad_lse_B):
        rows_BD, cols_ND, scale, lse_B = ctx.saved_tensors

        def dlogits(dots_BC, a, b):  # d lse_i / d logit_ij = softmax_ij, weighted by row i's incoming gradient
            return torch.exp(scale * dots_BC - lse_B[:, None]) * grad_lse_B[:, None]

        grad_rows, grad_cols, grad_scale, _ = _chunked_backward(rows_BD, cols_ND, scale, ctx.chunk, dlogits)
        return grad_rows, grad_cols, grad_scale, None


class _TiledSigmoidLoss(torch.autograd.Function):
    """sum_ij -logsigmoid(y_ij (scale * rows_i . cols_j + bias)), y = +1 where j == offset + i, else -1."""

    @staticmethod
    def forward(ctx, rows_BD, cols_ND, scale, bias, offset: int, chunk: int):
        total = rows_BD.new_zeros(())
        for a, b in _chunks(cols_ND.shape[0], chunk):
            z_BC = scale * (rows_BD @ cols_ND[a:b].T) + bias
            total = total - F.logsigmoid(-z_BC).sum()  # every pair as a negative ...
            i, j = _positives_in(offset, rows_BD.shape[0], a, b, rows_BD.device)
            if len(i):  # ... then swap the positives' terms: -logsig(z) - (-logsig(-z)) = z (exactly)
                total = total - z_BC[i, j].sum()
        ctx.save_for_backward(rows_BD, cols_ND, scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        rows_BD, cols_ND, scale, bias = ctx.saved_tensors

        def dlogits(dots_BC, a, b):  # d/dz -logsigmoid(y z) = sigmoid(z) for negatives, sigmoid(z) - 1 for positives
            dz_BC = torch.sigmoid(scale * dots_BC + bias)
            i, j = _positives_in(ctx.offset, rows_BD.shape[0], a, b, rows_BD.device)
            dz_BC[i, j] -= 1
            return dz_BC * grad_total

        grad_rows, grad_cols, grad_scale, grad_bias = _chunked_backward(rows_BD, cols_ND, scale, ctx.chunk, dlogits)
        return grad_rows, grad_cols, grad_scale, grad_bias, None, None


def _chunked_backward(rows_BD, cols_ND, scale, chunk: int, dlogits):
    """Backward through logits ``z = scale * rows @ cols.T (+ bias)``, recomputed ``chunk`` columns at a time.

    ``dlogits(dots_BC, a, b)`` gives dL/dz for columns [a, b). Returns the gradients of rows, cols and scale,
    and the sum of dL/dz (the gradient of an additive bias).
    """
    grad_rows, grad_cols = torch.zeros_like(rows_BD), torch.zeros_like(cols_ND)
    grad_scale, grad_shift = torch.zeros_like(scale), torch.zeros_like(scale)
    for a, b in _chunks(cols_ND.shape[0], chunk):
        dots_BC = rows_BD @ cols_ND[a:b].T
        dz_BC = dlogits(dots_BC, a, b)
        grad_rows += scale * (dz_BC @ cols_ND[a:b])
        grad_cols[a:b] = scale * (dz_BC.T @ rows_BD)
        grad_scale += (dz_BC * dots_BC).sum()
        grad_shift += dz_BC.sum()
    return grad_rows, grad_cols, grad_scale, grad_shift


def _positives_in(offset: int, num_rows: int, a: int, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column-in-chunk) indices of the diagonal pairs (row i <-> global column offset + i) in [a, b)."""
    lo, hi = max(a, offset), min(b, offset + num_rows)
    cols = torch.arange(lo, max(lo, hi), device=device)
    return cols - offset, cols - a


class InfoNCELoss(torch.nn.Module):
    """Symmetric InfoNCE: each rank's rows against the global batch's columns, labels offset by rank.

    ``impl="gathered"`` builds the B x N logits; ``impl="tiled"`` never does (``chunk_size`` columns at a time,
    ``"auto"`` from a memory budget). Both give the same value and gradients (to float rounding).
    """

    def __init__(self, impl: str = "gathered", chunk_size: int | str = "auto"):
        super().__init__()
        if impl not in ("gathered", "tiled"):
            raise ValueError(f"unknown InfoNCE impl {impl!r}")
        self.impl, self.chunk_size = impl, chunk_size

    def forward(self, img_emb_BD, txt_emb_BD, logit_scale, logit_bias=None):
        dtype = _compute_dtype(img_emb_BD)
        img_BD, txt_BD, scale = img_emb_BD.to(dtype), txt_emb_BD.to(dtype), logit_scale.to(dtype)
        rank, _ = rank_and_world()
        all_img_ND, all_txt_ND = all_gather_with_grad(img_BD), all_gather_with_grad(txt_BD)
        if self.impl == "gathered":
            labels_B = torch.arange(img_BD.shape[0], device=img_BD.device) + rank * img_BD.shape[0]
            logits_i2t_BN, logits_t2i_BN = scale * img_BD @ all_txt_ND.T, scale * txt_BD @ all_img_ND.T
            if logit_bias is not None:  # a shared bias cancels in softmax; kept so it gets its (zero) gradient
                logits_i2t_BN, logits_t2i_BN = logits_i2t_BN + logit_bias, logits_t2i_BN + logit_bias
            return (F.cross_entropy(logits_i2t_BN, labels_B) + F.cross_entropy(logits_t2i_BN, labels_B)) / 2
        chunk = self.chunk_size
        if chunk == "auto":
            chunk = auto_chunk_size(img_BD.shape[0], all_txt_ND.shape[0])
        positive_B = scale * (img_BD * txt_BD).sum(dim=1)
        lse_i2t_B = _TiledLogSumExp.apply(img_BD, all_txt_ND, scale, int(chunk))
        lse_t2i_B = _TiledLogSumExp.apply(txt_BD, all_img_ND, scale, int(chunk))
        loss = (lse_i2t_B + lse_t2i_B).mean() / 2 - positive_B.mean()
        if logit_bias is not None:
            loss = loss + (logit_bias - logit_bias)
        return loss


class SigLIPLoss(torch.nn.Module):
    """Sigmoid loss (SigLIP): local images against every rank's texts, summed over pairs, divided by local B.

    The text columns are processed ``chunk_size`` at a time and recomputed in backward, so memory for the
    pairwise terms stays O(B x chunk) whatever the world size (``"auto"``: from the same memory budget as
    tiled InfoNCE).
    """

    def __init__(self, chunk_size: int | str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, img_emb_BD, txt_emb_BD, logit_scale, logit_bias=None):
        if logit_bias is None:
            raise ValueError("SigLIPLoss needs logit_bias (use a model with init_logit_bias, e.g. loss=siglip)")
        dtype = _compute_dtype(img_emb_BD)
        img_BD, txt_BD = img_emb_BD.to(dtype), txt_emb_BD.to(dtype)
        rank, _ = rank_and_world()
        all_txt_ND = all_gather_with_grad(txt_BD)
        B = img_BD.shape[0]
        chunk = auto_chunk_size(B, all_txt_ND.shape[0]) if self.chunk_size == "auto" else int(self.chunk_size)
        total = _TiledSigmoidLoss.apply(
            img_BD, all_txt_ND, logit_scale.to(dtype), logit_bias.to(dtype), rank * B, chunk
        )
        return total / B


class Weighted(torch.nn.Module):
    """``weight`` x a loss (``loss.contrastive_weight`` beside CoCa's captioning term)."""

    def __init__(self, loss: torch.nn.Module, weight: float):
        super().__init__()
        self.loss, self.weight = loss, float(weight)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.weight * self.loss(*args, **kwargs)
