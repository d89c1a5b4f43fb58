"""Image-text matching (ITM): a small fusion head that scores whether an image and a caption belong together.

BLIP and FLAVA train such a head beside the contrastive loss, on the positive pairs and on hard negatives mined
from the contrastive similarities (``loss/itm.py``); at eval it re-ranks the top candidates of plain retrieval.
clipkit's head fuses the two towers' normalised embeddings, so it works with every dual encoder open_clip builds
(CoCa included) and under every engine, gradient caching included: one (image, caption) pair's logit is

    fc2(gelu(fc1([√D u, √D v, D u * v])))     u, v: the pair's normalised image and text embeddings (D each)

(the scales give the inputs components of about unit size, as a network's hidden states have; the
normalised embeddings' own, about 1/√D and 1/D, left the head near its prior for a thousand steps on the demo).

(BLIP's head reads the image's patch tokens through cross-attention in the text encoder instead: richer, but
tied to one architecture and to token states that gradient caching would have to keep.)

The head lives on the model as ``itm_head`` (checkpoints, EMA, LoRA and the engines see it as one more shared
module, like the temperature), and the model's forward also returns its weights (``itm_head`` in the output
dict). The loss applies them to pairs it forms after the forward; that is how the temperature reaches the loss
too, so DDP's reducer, FSDP's root unit and gradient caching (which backpropagates the weights' cached gradient
once, on the last micro-batch) treat the head as they treat the temperature. Exports leave it out (``detach``):
open_clip, transformers and onnxruntime load the encoders as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KEY = "itm_head"  # the module's name on the model, its state-dict prefix and its key in the forward's outputs


class FusionHead(torch.nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(3 * dim, width)
        self.fc2 = torch.nn.Linear(width, 1)

    def weights(self) -> tuple[torch.Tensor, ...]:
        return (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

    def forward(self, img_BD: torch.Tensor, txt_BD: torch.Tensor) -> torch.Tensor:
        return score(img_BD, txt_BD, self.weights())


def score(img_BD: torch.Tensor, txt_BD: torch.Tensor, weights) -> torch.Tensor:
    """The ITM logit of each pair (row i of ``img_BD`` with row i of ``txt_BD``), computed in the embeddings'
    dtype with ``weights`` = (fc1.weight, fc1.bias, fc2.weight, fc2.bias) cast to it."""
    w1, b1, w2, b2 = (w.to(img_BD.dtype) for w in weights)
    d = img_BD.shape[1]
    x = torch.cat([d**0.5 * img_BD, d**0.5 * txt_BD, d * img_BD * txt_BD], dim=1)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)[:, 0]


_CLASSES: dict[type, type] = {}


def _with_head(cls: type) -> type:
    """``cls`` whose forward also returns the ITM head's weights (views: their gradient reaches the parameters
    through the forward, as the temperature's does)."""
    if cls not in _CLASSES:

        def forward(self, *args, **kwargs):
            out = dict(cls.forward(self, *args, **kwargs))
            out[KEY] = tuple(w.view_as(w) for w in getattr(self, KEY).weights())
            return out

        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "_itm_base": cls})
    return _CLASSES[cls]


def attach(model: torch.nn.Module, dim: int, width: int) -> str:
    """Adds a fresh head (from the current RNG state) to an open_clip model built with ``output_dict=True``;
    returns a line for the run log."""
    head = FusionHead(dim, width).to(next(model.parameters()).device)
    model.add_module(KEY, head)
    model.__class__ = _with_head(type(model))
    params = sum(p.numel() for p in head.parameters())
    return f"ITM head: {dim * 3} -> {width} -> 1 on the embeddings ({params:,} params)"


def has_head(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, KEY, None), FusionHead)


def detach(model: torch.nn.Module) -> None:
    """Takes the head off (for exports): the model is open_clip's class again, with open_clip's state dict."""
    if has_head(model):
        delattr(model, KEY)
        model.__class__ = model._itm_base


def split(weights: dict) -> tuple[dict, dict]:
    """A state dict as (everything but the head's entries, the head's entries; {} when it has none)."""
    head = {k: v for k, v in weights.items() if k.startswith(KEY + ".")}
    return {k: v for k, v in weights.items() if k not in head}, head


def full_weights(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The head's weights as plain tensors on every rank (a collective under FSDP, whose parameters are DTensor
    shards: every rank must call it)."""
    out = []
    for w in getattr(model, KEY).weights():
        w = w.detach()
        out.append(w.full_tensor() if hasattr(w, "full_tensor") else w)
    return tuple(out)


@torch.no_grad()
def rerank_ranks(sim_QC: torch.Tensor, own_QC: torch.Tensor, itm_logit, k: int) -> torch.Tensor:
    """The 1-based rank of each query's best-ranked correct item after its top ``k`` candidates by similarity
    are re-ordered by ITM logit (``itm_logit(query_rows, candidate_columns) -> logits``, flat index lists).

    The candidates: the items more similar than the k-th most similar, then those tied with it, the query's
    correct items first (plain retrieval counts a tie in the correct item's favour too: its rank is 1 + the items
    strictly more similar). A correct candidate: 1 + the candidates with a strictly higher ITM logit than the
    best correct one. None: the similarity rank, then above k. ``own_QC`` marks each query's correct items."""
    k = min(k, sim_QC.shape[1])
    kth = sim_QC.topk(k, dim=1).values[:, -1:]
    tied = sim_QC == kth
    preference = 3 * (sim_QC > kth) + 2 * (tied & own_QC) + (tied & ~own_QC)  # (small integers: exact as floats)
    top_QK = preference.float().topk(k, dim=1).indices
    rows = torch.arange(sim_QC.shape[0], device=sim_QC.device)[:, None].expand_as(top_QK)
    logits_QK = itm_logit(rows.reshape(-1), top_QK.reshape(-1)).reshape(top_QK.shape)
    hit_QK = own_QC.gather(1, top_QK)
    best_hit = logits_QK.masked_fill(~hit_QK, -torch.inf).max(dim=1, keepdim=True).values
    inside = 1 + (logits_QK > best_hit).sum(dim=1)
    best_own = sim_QC.masked_fill(~own_QC, -torch.inf).max(dim=1, keepdim=True).values
    outside = (sim_QC > best_own).sum(dim=1) + 1
    return torch.where(hit_QK.any(dim=1), inside, outside)
