"""Zero-shot classification and image<->text retrieval, with CLIP_benchmark's metric definitions, on any number
of ranks.

Classification: class embeddings are the re-normalised mean of the normalised template embeddings
(open_clip's ``build_zero_shot_classifier``); logits are 100 x cosine; top-1, top-5, mean per-class recall
(balanced accuracy over the classes present) and each class's recall.
Retrieval: recall@k is the fraction of queries with at least one correct item in their top k (image->text:
any of the image's captions; text->image: its image); also mean and median rank of the first correct item.
Similarities are computed in query chunks, so memory is O(chunk x items), never items x items.

Distributed: each rank embeds its share of the records (and of the classes' prompts); rank 0 gathers
(index, embedding) pairs, restores the source order and computes the metrics, which therefore equal one
process's. Only rank 0 returns results; the other ranks return None.
"""

from __future__ import annotations

import collections
import contextlib
import math

import open_clip
import torch

from clipkit import distributed
from clipkit.eval import data as eval_data
from clipkit.eval.captioning import caption_scores


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], device, batch_size: int = 512, amp=None) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        with _autocast(device, amp):
            out.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _embed_share(model, loader, device, amp, on_batch=None, captioner=None):
    """This rank's (index, image embedding, target) lists and skip counts; ``on_batch`` sees each batch;
    ``captioner`` (images -> texts), if given, captions every image and its texts are a fifth list."""
    indices, embs, targets, skips, generated = [], [], [], collections.Counter(), []
    for batch in loader:
        skips.update(batch["skips"])
        if batch["image"] is None:
            continue
        with _autocast(device, amp):
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


def _merge(shares: list) -> tuple[torch.Tensor, list, dict, list[int]]:
    """Rank 0: every rank's share, back in source order; also the records' positions in the source."""
    skips = sum((collections.Counter(s[3]) for s in shares), collections.Counter())
    indices = [i for share in shares for i in share[0]]
    if not indices:
        return torch.empty(0), [], dict(sorted(skips.items())), []
    embs = torch.cat([e for share in shares for e in share[1]])
    targets = [t for share in shares for t in share[2]]
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return embs[order], [targets[i] for i in order], dict(sorted(skips.items())), [indices[i] for i in order]


MAX_CONFUSION_CLASSES = 64  # larger class sets keep per-class recall only (a 1000 x 1000 matrix is not a plot)


def template_fn(template: str):
    return lambda c: template.replace("{c}", c)


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: list[str], templates: list[str], device, amp=None) -> torch.Tensor:
    """[D, C] class embeddings; with W ranks each builds the classes c with c % W == rank, all ranks get all.
    (With fewer classes than ranks, the ranks without a class contribute nothing.)"""
    rank, world = distributed.rank_and_world()
    mine = [classnames[c] for c in range(rank, len(classnames), world)]
    part = None
    if mine:  # open_clip refuses an empty class list
        with _autocast(device, amp):
            part = open_clip.build_zero_shot_classifier(
                model,
                tokenizer,
                mine,
                [template_fn(t) for t in templates],
                num_classes_per_batch=10,
                device=device,
                use_tqdm=False,
            ).float()
        part = part.cpu()
    parts = distributed.all_gather_object(part)
    classifier = torch.empty(parts[0].shape[0], len(classnames))  # rank 0 always has class 0
    for r, p in enumerate(parts):
        if p is not None:
            classifier[:, r::world] = p
    return classifier.to(device)


def zeroshot_classification(model, tokenizer, source, transform, classnames, templates, device, cfg, progress=None):
    model.eval()
    amp = cfg.amp_dtype
    rank, world = distributed.rank_and_world()
    classifier_DC = build_classifier(model, tokenizer, classnames, templates, device, amp)
    loader = eval_data.loader(source, transform, rank, world, cfg.batch_size, cfg.num_workers)
    share = _embed_share(model, loader, device, amp, progress)
    shares = distributed.gather_to_main(share)
    if shares is None:
        return None
    img_emb_ND, labels, skips, _ = _merge(shares)
    known = [i for i, label in enumerate(labels) if 0 <= label < len(classnames)]
    if len(known) < len(labels):  # a shard's cls beyond the class list: counted, never silently scored as wrong
        skips = {**skips, "unknown_label": skips.get("unknown_label", 0) + len(labels) - len(known)}
        img_emb_ND, labels = img_emb_ND[known], [labels[i] for i in known]
    if not labels:
        raise eval_data.EvalDataError(f"no usable images in {source.description} (skipped: {skips})")
    logits_NC = 100.0 * img_emb_ND.to(device) @ classifier_DC
    labels_N = torch.tensor(labels, device=device)
    metrics = classification_metrics(logits_NC, labels_N, len(classnames))
    metrics["per_class_recall"] = {classnames[c]: v for c, v in metrics["per_class_recall"].items()}
    if len(classnames) <= MAX_CONFUSION_CLASSES:  # for the run report; [true class][predicted class] counts
        metrics["classnames"] = list(classnames)
        metrics["confusion"] = confusion_matrix(logits_NC.argmax(dim=1), labels_N, len(classnames))
    metrics["skipped"] = skips
    return metrics


def zeroshot_retrieval(model, tokenizer, source, transform, device, cfg, progress=None, captioner=None):
    """Recall@k both ways; with ``captioner`` (a CoCa model's images -> texts) also BLEU-4 and CIDEr of each
    image's caption against the set's captions of that image, and the first five as examples."""
    model.eval()
    amp = cfg.amp_dtype
    rank, world = distributed.rank_and_world()
    loader = eval_data.loader(source, transform, rank, world, cfg.batch_size, cfg.num_workers)
    indices, embs, captions, skips, *generated = _embed_share(model, loader, device, amp, progress, captioner)
    # Each rank embeds its own images' captions too; they travel (with their text) with the image embeddings.
    txt = embed_texts(model, tokenizer, [c for caps in captions for c in caps], device, amp=amp).cpu()
    txt_per_image = list(zip(txt.split([len(caps) for caps in captions]), captions, strict=True)) if captions else []
    shares = distributed.gather_to_main((indices, embs, txt_per_image, skips, *generated))
    if shares is None:
        return None
    img_emb_ND, per_image, skips, records = _merge(shares)
    if not per_image:
        raise eval_data.EvalDataError(f"no usable image-caption pairs in {source.description} (skipped: {skips})")
    txt_parts = [t for t, _ in per_image]
    owner_M = torch.cat([torch.full((len(t),), i) for i, t in enumerate(txt_parts)])
    img_emb_ND, txt_emb_MD, owner_M = img_emb_ND.to(device), torch.cat(txt_parts).to(device), owner_M.to(device)
    metrics = retrieval_metrics(img_emb_ND, txt_emb_MD, owner_M)
    metrics.update(num_images=img_emb_ND.shape[0], num_texts=int(owner_M.numel()), skipped=skips)
    texts = [c for _, caps in per_image for c in caps]
    metrics["examples"] = retrieval_examples(img_emb_ND, txt_emb_MD, owner_M, texts, records)
    if captioner is not None:  # (in source order, as _merge put the images)
        by_index = {i: g for share in shares for i, g in zip(share[0], share[4], strict=True)}
        generated = [by_index[i] for i in records]
        references = [list(caps) for _, caps in per_image]
        scores = caption_scores(generated, references)
        metrics.update({f"caption_{k}": v for k, v in scores.items()})
        metrics["caption_examples"] = [
            {"image": records[i], "caption": generated[i], "references": references[i]}
            for i in range(min(5, len(generated)))
        ]
    return metrics


def confusion_matrix(pred_N: torch.Tensor, labels_N: torch.Tensor, num_classes: int) -> list[list[int]]:
    """[true][predicted] counts."""
    flat = torch.bincount(labels_N * num_classes + pred_N, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()


def retrieval_examples(img_emb_ND, txt_emb_MD, owner_M, texts, records, n: int = 6, k: int = 5) -> list[dict]:
    """``n`` caption queries spread over the set, each with its top-``k`` images and its own image, as
    positions in the dataset (``records``: the record index of each embedded image): what the run report shows
    as thumbnails."""
    m = txt_emb_MD.shape[0]
    picks = sorted({int(i * m / n) for i in range(n)}) if m else []
    out = []
    for q in picks:
        top = (txt_emb_MD[q] @ img_emb_ND.T).topk(min(k, img_emb_ND.shape[0])).indices.tolist()
        out.append({"caption": texts[q], "image": records[int(owner_M[q])], "top": [records[i] for i in top]})
    return out


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


def retrieval_metrics(
    img_emb_ND: torch.Tensor,
    txt_emb_MD: torch.Tensor,
    txt_to_img_M: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int | None = None,
    budget_bytes: int = 256 << 20,
) -> dict:
    """Recall@k both ways plus mean/median rank (1-based) of the first correct item.

    Queries are processed in chunks whose similarity block stays within ``budget_bytes`` (or ``chunk`` rows),
    so 100k images x 500k captions never builds the full matrix. A rank is 1 + the number of items scoring
    strictly higher than the best correct one. Captions must be grouped by image (``txt_to_img_M``
    non-decreasing), so an image chunk's own captions are one contiguous column range.
    """
    n_img, n_txt = img_emb_ND.shape[0], txt_emb_MD.shape[0]
    if n_txt > 1 and bool((txt_to_img_M[1:] < txt_to_img_M[:-1]).any()):
        raise ValueError("captions must be grouped by image (txt_to_img_M non-decreasing)")
    first_caption = torch.searchsorted(txt_to_img_M, torch.arange(n_img + 1, device=txt_to_img_M.device))
    # image -> text: the rank of the best-ranked caption of the image.
    rows = chunk or max(1, budget_bytes // (4 * max(n_txt, 1)))
    i2t_ranks = []
    for s in range(0, n_img, rows):
        e = min(s + rows, n_img)
        sim_CM = img_emb_ND[s:e] @ txt_emb_MD.T
        c0, c1 = int(first_caption[s]), int(first_caption[e])
        own_CK = txt_to_img_M[None, c0:c1] == torch.arange(s, e, device=sim_CM.device)[:, None]
        best_own = sim_CM[:, c0:c1].masked_fill(~own_CK, -math.inf).max(dim=1, keepdim=True).values
        i2t_ranks.append((sim_CM > best_own).sum(dim=1) + 1)
    # text -> image: the rank of the caption's own image.
    rows = chunk or max(1, budget_bytes // (4 * max(n_img, 1)))
    t2i_ranks = []
    for s in range(0, n_txt, rows):
        sim_CN = txt_emb_MD[s : s + rows] @ img_emb_ND.T
        own_sim = sim_CN.gather(1, txt_to_img_M[s : s + rows, None])
        t2i_ranks.append((sim_CN > own_sim).sum(dim=1) + 1)
    out = {}
    for name, ranks in (("image_to_text", torch.cat(i2t_ranks)), ("text_to_image", torch.cat(t2i_ranks))):
        for k in ks:
            out[f"{name}_R@{k}"] = (ranks <= k).double().mean().item()
        out[f"{name}_mean_rank"] = ranks.double().mean().item()
        out[f"{name}_median_rank"] = ranks.double().median().item()
    out["mean_R@1"] = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2
    return out
