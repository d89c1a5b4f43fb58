"""Zero-shot classification and image<->text retrieval, with CLIP_benchmark's metric definitions.

Classification: class embeddings are the re-normalised mean of the normalised template embeddings
(open_clip's ``build_zero_shot_classifier``); logits are 100 x cosine; top-1, top-5, mean per-class recall.
Retrieval: recall@k is the fraction of queries with at least one correct item in their top k (image->text:
any of the image's captions; text->image: its image); also mean and median rank of the first correct item.
"""

from __future__ import annotations

import math

import open_clip
import torch

from clipkit.data.transforms import DeviceNormalize
from clipkit.eval.data import EvalSkips, classification_batches, retrieval_batches


@torch.no_grad()
def embed_images(model, normalize: DeviceNormalize, images_u8: torch.Tensor, device) -> torch.Tensor:
    x = normalize(images_u8.to(device, non_blocking=True))
    return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], device, batch_size: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        out.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out) if out else torch.empty(0)


def classification_metrics(logits_NC: torch.Tensor, labels_N: torch.Tensor, num_classes: int) -> dict:
    top5 = logits_NC.topk(min(5, num_classes), dim=1).indices
    correct1 = top5[:, 0] == labels_N
    correct5 = (top5 == labels_N[:, None]).any(dim=1)
    per_class = {}
    for c in range(num_classes):
        mask = labels_N == c
        if mask.any():
            per_class[c] = correct1[mask].double().mean().item()
    return {
        "acc1": correct1.double().mean().item(),
        "acc5": correct5.double().mean().item(),
        "mean_per_class_recall": sum(per_class.values()) / max(1, len(per_class)),
        "per_class_recall": per_class,
        "num_samples": int(labels_N.numel()),
        "num_classes": num_classes,
        "chance": 1.0 / num_classes,
    }


def template_fn(template: str):
    """``{c}`` (or a bare ``{}``) is the class name; anything else raises a clear error."""
    if "{c}" in template:
        return lambda c: template.replace("{c}", c)
    if "{}" in template:
        return lambda c: template.replace("{}", c)
    raise ValueError(f"prompt template {template!r} has no {{c}} placeholder for the class name")


@torch.no_grad()
def zeroshot_classification(
    model,
    tokenizer,
    normalize,
    spec: str,
    classnames: list[str],
    templates: list[str],
    image_size: int,
    device,
    batch_size: int = 256,
) -> dict:
    model.eval()
    classifier_DC = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, [template_fn(t) for t in templates], num_classes_per_batch=10, device=device
    ).float()
    skips = EvalSkips()
    logits, labels = [], []
    for images_u8, labels_B in classification_batches(spec, image_size, batch_size, skips):
        logits.append(100.0 * embed_images(model, normalize, images_u8, device) @ classifier_DC)
        labels.append(labels_B.to(device))
    if not logits:
        raise ValueError(f"no usable samples in {spec!r} (skipped: {skips.counts})")
    metrics = classification_metrics(torch.cat(logits), torch.cat(labels), len(classnames))
    metrics["per_class_recall"] = {classnames[c]: v for c, v in metrics["per_class_recall"].items()}
    metrics["skipped"] = skips.counts
    return metrics


def retrieval_metrics(
    img_emb_ND: torch.Tensor,
    txt_emb_MD: torch.Tensor,
    txt_to_img_M: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 4096,
) -> dict:
    """Recall@k both ways plus mean/median rank (1-based) of the first correct item; chunked over queries."""
    n_img = img_emb_ND.shape[0]
    # image -> text: the rank of the best-ranked caption of the image.
    i2t_ranks = []
    for s in range(0, n_img, chunk):
        sim_CM = img_emb_ND[s : s + chunk] @ txt_emb_MD.T
        own = txt_to_img_M[None, :] == torch.arange(s, s + sim_CM.shape[0], device=sim_CM.device)[:, None]
        best_own = sim_CM.masked_fill(~own, -math.inf).max(dim=1, keepdim=True).values
        i2t_ranks.append((sim_CM > best_own).sum(dim=1) + 1)
    # text -> image: the rank of the caption's own image.
    t2i_ranks = []
    for s in range(0, txt_emb_MD.shape[0], chunk):
        sim_CN = txt_emb_MD[s : s + chunk] @ img_emb_ND.T
        own_sim = sim_CN.gather(1, txt_to_img_M[s : s + chunk, None])
        t2i_ranks.append((sim_CN > own_sim).sum(dim=1) + 1)
    out = {}
    for name, ranks in (("image_to_text", torch.cat(i2t_ranks)), ("text_to_image", torch.cat(t2i_ranks))):
        for k in ks:
            out[f"{name}_R@{k}"] = (ranks <= k).double().mean().item()
        out[f"{name}_mean_rank"] = ranks.double().mean().item()
        out[f"{name}_median_rank"] = ranks.double().median().item()
    out["mean_R@1"] = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2
    return out


@torch.no_grad()
def zeroshot_retrieval(model, tokenizer, normalize, spec: str, image_size: int, device, batch_size: int = 256) -> dict:
    model.eval()
    skips = EvalSkips()
    img_embs, texts, owner = [], [], []
    for images_u8, caption_lists in retrieval_batches(spec, image_size, batch_size, skips):
        base = sum(e.shape[0] for e in img_embs)
        img_embs.append(embed_images(model, normalize, images_u8, device))
        for i, caps in enumerate(caption_lists):
            texts.extend(caps)
            owner.extend([base + i] * len(caps))
    if not img_embs:
        raise ValueError(f"no usable samples in {spec!r} (skipped: {skips.counts})")
    metrics = retrieval_metrics(
        torch.cat(img_embs), embed_texts(model, tokenizer, texts, device), torch.tensor(owner, device=device)
    )
    metrics.update(num_images=sum(e.shape[0] for e in img_embs), num_texts=len(texts), skipped=skips.counts)
    return metrics
