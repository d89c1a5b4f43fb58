"""What the evaluators share: embedding a rank's share of an eval set (and texts) and merging the shares on rank 0.

Distributed: each rank embeds its share of the records; rank 0 gathers (index, embedding) pairs and restores the
source order, so the metrics computed from them equal one process's.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2


def eval_transform(model):
    """open_clip's own eval preprocessing for this model (resize short side, centre crop, normalise)."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], device, batch_size: int = 512, amp=None) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        with autocast(device, amp):
            out.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_share(model, loader, device, amp, on_batch=None, captioner=None):
    """This rank's (index, image embedding, target) lists and skip counts; ``on_batch`` sees each batch;
    ``captioner`` (images -> texts), if given, captions every image and its texts are a fifth list."""
    indices, embs, targets, skips, generated = [], [], [], collections.Counter(), []
    for batch in loader:
        skips.update(batch["skips"])
        if batch["image"] is None:
            continue
        with autocast(device, amp):
            images = batch["image"].to(device, non_blocking=True)
            emb = model.encode_image(images)
            if captioner is not None:
                generated += captioner(images)
        embs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        indices += batch["index"]
        targets += batch["target"]
        if on_batch:
            on_batch(len(batch["index"]) + len(batch["skips"]))
    if captioner is not None:
        return indices, embs, targets, skips, generated
    return indices, embs, targets, skips


def merge(shares: list) -> tuple[torch.Tensor, list, dict, list[int]]:
    """Rank 0: every rank's share, back in source order; also the records' positions in the source."""
    skips = sum((collections.Counter(s[3]) for s in shares), collections.Counter())
    indices = [i for share in shares for i in share[0]]
    if not indices:
        return torch.empty(0), [], dict(sorted(skips.items())), []
    embs = torch.cat([e for share in shares for e in share[1]])
    targets = [t for share in shares for t in share[2]]
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return embs[order], [targets[i] for i in order], dict(sorted(skips.items())), [indices[i] for i in order]
