"""CoCa's captioning term: ``weight`` x the mean next-token cross-entropy over every caption token of the global
batch (teacher forcing; the padding is ignored).

The mean is over the *global* batch's target tokens, counted once per step across every rank and micro-batch
(``target_count``, one all-reduce of a scalar). Each rank returns ``world x (its tokens' summed cross-entropy) /
count``, so that averaging the ranks' gradients (what DDP, FSDP and ZeRO do) gives exactly the gradient of the
global mean, and the ranks' losses average to it. open_clip's ``CoCaLoss`` takes the mean over each rank's own
tokens instead, which weights a rank's tokens by how few of them it has: the global batch's loss only when every
rank holds the same number of caption tokens. The term is per sample (no gather), so under gradient caching each
micro-batch's share is backpropagated with its re-forward, with the same count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipkit.distributed import rank_and_world


class CaptionLoss:
    def __init__(self, weight: float, pad_id: int = 0):
        self.weight, self.pad_id = float(weight), int(pad_id)

    def target_count(self, texts: list[torch.Tensor]) -> torch.Tensor:
        """How many tokens the captioner predicts in this step's global batch (``text[:, 1:]`` that is not
        padding), summed over ``texts`` (this rank's micro-batches) and every rank; on the device, no host read."""
        count = sum((t[:, 1:] != self.pad_id).sum() for t in texts).to(torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
        return count.clamp_min(1)

    def __call__(self, logits_BLV: torch.Tensor, labels_BL: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """This rank's share of the term for one micro-batch: ``logits_BLV[:, t]`` predicts ``labels_BL[:, t]``."""
        _, world = rank_and_world()
        dtype = torch.float64 if logits_BLV.dtype == torch.float64 else torch.float32
        summed = F.cross_entropy(
            logits_BLV.flatten(0, 1).to(dtype), labels_BL.flatten(), ignore_index=self.pad_id, reduction="sum"
        )
        return summed * (self.weight * world / count.to(dtype))
