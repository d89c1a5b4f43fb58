"""The image-text matching term (``loss.itm_weight``): BLIP's recipe, exact at any world size.

Each image is paired with its caption (a positive) and with one hard negative caption; each caption with one hard
negative image. The negatives are drawn from the whole *global* batch, every rank's rows, with probabilities
softmax(similarity x temperature) over the row's negatives (its own pair masked out before the softmax, so the
weights never all underflow). The head (``clipkit/itm.py``) scores the 3 pairs per row; the term is the binary
cross-entropy of their logits, the mean over the rank's 3 x rows pairs times the weight, so DDP's average over
ranks gives the global batch's mean, as with the contrastive losses. Gradients reach the negatives' embeddings
on the ranks that own them (the gather's backward), the head's weights, and not the temperature (the sampling
weights carry none, as in BLIP).

The draw is seeded and layout-free. Each row has an id, its place in the step's *canonical* global batch (the
loader's order, the same at every world size and worker count; by default rank-major positions), and the draw
for row g at step s uses the uniforms ``draws(seed, s, N)[:, g]``. The negative is then found by inverse CDF
over the columns taken in id order: a function of (seed, step, the global batch as a set), not of which rank
held which row, so 1 process and W ranks pick the same negatives (tested in float64 against one process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.distributed import all_gather_flat, all_gather_with_grad, rank_and_world
from clipkit.itm import score


def draws(seed: int, step: int, n: int) -> torch.Tensor:
    """2 x ``n`` uniforms in [0, 1), float64: row 0 picks each image's negative caption, row 1 each caption's
    negative image, column g for the row of id g. A pure function of (seed, step); a larger batch extends the
    same columns."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.rand((n, 2), generator=g, dtype=torch.float64).T


def hard_negatives(sim_RN: torch.Tensor, ids_R: torch.Tensor, ids_N: torch.Tensor, u_R: torch.Tensor) -> torch.Tensor:
    """For each row, the column of its negative: drawn with probabilities softmax(sim) over the columns that are
    not its own (ids differ), by inverse CDF over the columns in id order with the row's uniform ``u_R``."""
    logits = sim_RN.masked_fill(ids_N[None, :] == ids_R[:, None], -torch.inf)
    order = ids_N.argsort()
    cdf = logits[:, order].softmax(dim=1).cumsum(dim=1)
    at = torch.searchsorted(cdf, (u_R.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)[:, 0]
    return order[at.clamp(max=len(order) - 1)]


class ITMLoss:
    """``ITMLoss(weight, seed)``; ``at(step, ids, n, device)`` gives the step's term,
    ``term(img_RD, txt_RD, logit_scale, head_weights) -> scalar`` over this rank's R rows."""

    def __init__(self, weight: float, seed: int):
        self.weight, self.seed = float(weight), int(seed)

    def at(self, step: int, ids_R: torch.Tensor | None, n: int, device: torch.device) -> ITMTerm:
        """The term of step ``step`` on a global batch of ``n`` rows; ``ids_R``: this rank's rows' ids in the
        canonical global batch (None: their rank-major positions). Its uniforms are drawn here, outside any
        compiled step (``train.compile=step`` then sees tensors of one shape every step)."""
        ids_R = None if ids_R is None else ids_R.to(device)
        return ITMTerm(self.weight, draws(self.seed, step, n).to(device), ids_R)


class ITMTerm:
    def __init__(self, weight: float, u_2N: torch.Tensor, ids_R: torch.Tensor | None):
        self.weight, self.u_2N, self.ids_R = weight, u_2N, ids_R
        self.logged: dict[str, torch.Tensor] = {}

    def __call__(self, img_RD, txt_RD, logit_scale, head) -> torch.Tensor:
        dtype = torch.float64 if img_RD.dtype == torch.float64 else torch.float32
        img_RD, txt_RD = img_RD.to(dtype), txt_RD.to(dtype)
        rank, world = rank_and_world()
        R = img_RD.shape[0]
        ids_R = self.ids_R if self.ids_R is not None else rank * R + torch.arange(R, device=img_RD.device)
        all_img_ND, all_txt_ND = all_gather_with_grad(img_RD), all_gather_with_grad(txt_RD)
        ids_N = ids_R if world == 1 else all_gather_flat(ids_R)
        with torch.no_grad():
            scale = logit_scale.detach().to(dtype)
            neg_txt = hard_negatives(scale * img_RD @ all_txt_ND.T, ids_R, ids_N, self.u_2N[0, ids_R])
            neg_img = hard_negatives(scale * txt_RD @ all_img_ND.T, ids_R, ids_N, self.u_2N[1, ids_R])
        images = torch.cat([img_RD, img_RD, all_img_ND[neg_img]])
        texts = torch.cat([txt_RD, all_txt_ND[neg_txt], txt_RD])
        labels = torch.cat([img_RD.new_ones(R), img_RD.new_zeros(2 * R)])
        logits = score(images, texts, head)
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        # (for the run log: the unweighted term and the fraction of pairs the head gets right, on this rank's rows)
        self.logged = {"itm_loss": bce.detach(), "itm_accuracy": ((logits > 0) == (labels > 0)).to(dtype).mean()}
        return self.weight * bce
