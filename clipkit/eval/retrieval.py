"""Image<->text retrieval, with CLIP_benchmark's metric definitions, on any number of ranks (the ``retrieval``
evaluator); for a captioning model (CoCa) also the BLEU-4 and CIDEr of its captions of the same images.

Recall@k is the fraction of queries with at least one correct item in their top k (image->text: any of the
image's captions; text->image: its image); also mean and median rank of the first correct item. Similarities are
computed in query chunks, so memory is O(chunk x items), never items x items. Each rank embeds its share of the
images and their captions; rank 0 merges them in source order (``embedding``), so the metrics equal one
process's. Only rank 0 returns results; the other ranks return None.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import replace

import torch
from PIL import Image

from clipkit import distributed, itm
from clipkit.eval import data as eval_data
from clipkit.eval.captioning import caption_scores, decode, greedy_captions
from clipkit.eval.config import RetrievalConfig
from clipkit.eval.embedding import embed_share, embed_texts, merge
from clipkit.eval.registry import EvalContext, Evaluator, register

log = logging.getLogger("clipkit")
THUMB = 72  # px, the report's thumbnails
MAX_SCAN = 50_000  # eval records read at most to find the thumbnails of the examples


@register
class Retrieval(Evaluator):
    kind = "retrieval"
    demo_split = "retrieval"

    def run(self, ctx: EvalContext, cfg: RetrievalConfig) -> dict | None:
        source = eval_data.retrieval_source(cfg.dataset, cfg)
        captioner = _captioner(ctx.built) if hasattr(ctx.built.model, "text_decoder") else None  # CoCa: captions too
        return zeroshot_retrieval(ctx, source, captioner, cfg.itm_k)

    def rows(self, label: str, res: dict) -> list[tuple[str, str]]:
        rows = []
        if "caption_CIDEr" in res:
            rows.append(
                (
                    f"{label}captioning BLEU-4 / CIDEr",
                    f"{100 * res['caption_BLEU-4']:.1f} / {100 * res['caption_CIDEr']:.1f}",
                )
            )
        for d in ("image_to_text", "text_to_image"):
            recalls = " / ".join(f"{100 * res[f'{d}_R@{k}']:.1f}%" for k in (1, 5, 10))
            rows.append((f"{label}{d.replace('_', ' ')} R@1/5/10", recalls))
            if f"itm_{d}_R@1" in res:
                recalls = " / ".join(f"{100 * res[f'itm_{d}_R@{k}']:.1f}%" for k in (1, 5, 10))
                rows.append((f"{label}{d.replace('_', ' ')} R@1/5/10, top {res['itm_k']} re-ranked by ITM", recalls))
        rows.append((f"{label}retrieval set", f"{res['num_images']} images, {res['num_texts']} captions"))
        for ex in res.get("caption_examples", []):
            rows.append(
                (f"{label}caption of image {ex['image']}", f"{ex['caption']!r}  (a reference: {ex['references'][0]!r})")
            )
        return rows

    def cards(self, name: str, res: dict) -> list[tuple[str, str]]:
        return [
            (f"{100 * res['image_to_text_R@1']:.1f}%", f"{name} image→text R@1"),
            (f"{100 * res['text_to_image_R@1']:.1f}%", f"{name} text→image R@1"),
        ]

    def curves(self, name: str, res: dict) -> dict[str, float]:
        return {f"{name} mean R@1": 100 * res["mean_R@1"]}

    def report(self, name: str, res: dict, run_config: dict) -> list[str]:
        thumbs = _read_thumbnails(res, _retrieval_cfg(run_config))
        parts = [
            f"<h2>Retrieval examples: {html.escape(name)}</h2>",
            f'<div class="sub">{html.escape(str(res.get("dataset", "")))}</div>',
            _examples(res, thumbs),
        ]
        if res.get("caption_examples"):
            parts += [f"<h2>Captions: {html.escape(name)}</h2>", _captions(res, thumbs)]
        return parts


def _captioner(built):
    """images -> greedy captions. Under several ranks every rank decodes the same number of steps (a sharded
    model's forward is a collective), not stopping early when its own captions have all ended."""
    synchronous = distributed.rank_and_world()[1] > 1
    return lambda images: decode(built.tokenizer, greedy_captions(built.model, images, synchronous=synchronous))


def zeroshot_retrieval(ctx: EvalContext, source, captioner=None, itm_k: int = 0) -> dict | None:
    """Recall@k both ways; with ``captioner`` (a CoCa model's images -> texts) also BLEU-4 and CIDEr of each
    image's caption against the set's captions of that image, and the first five as examples; for a model with
    an ITM head (and ``itm_k``), the recalls after re-ranking each query's top ``itm_k`` by the head too."""
    model, device, amp = ctx.built.model, ctx.device, ctx.amp_dtype
    model.eval()
    head = itm.full_weights(model) if itm_k and itm.has_head(model) else None  # (every rank: FSDP gathers it)
    rank, world = distributed.rank_and_world()
    loader = eval_data.loader(source, ctx.transform, rank, world, ctx.batch_size, ctx.num_workers)
    indices, embs, captions, skips, *generated = embed_share(model, loader, device, amp, ctx.progress, captioner)
    # Each rank embeds its own images' captions too; they travel (with their text) with the image embeddings.
    txt = embed_texts(model, ctx.built.tokenizer, [c for caps in captions for c in caps], device, amp=amp).cpu()
    txt_per_image = list(zip(txt.split([len(caps) for caps in captions]), captions, strict=True)) if captions else []
    shares = distributed.gather_to_main((indices, embs, txt_per_image, skips, *generated))
    if shares is None:
        return None
    img_emb_ND, per_image, skips, records = merge(shares)
    if not per_image:
        raise eval_data.EvalDataError(f"no usable image-caption pairs in {source.description} (skipped: {skips})")
    txt_parts = [t for t, _ in per_image]
    owner_M = torch.cat([torch.full((len(t),), i) for i, t in enumerate(txt_parts)])
    img_emb_ND, txt_emb_MD, owner_M = img_emb_ND.to(device), torch.cat(txt_parts).to(device), owner_M.to(device)
    metrics = retrieval_metrics(img_emb_ND, txt_emb_MD, owner_M)
    metrics.update(num_images=img_emb_ND.shape[0], num_texts=int(owner_M.numel()), skipped=skips)
    if head is not None:
        metrics.update(itm_rerank_metrics(img_emb_ND, txt_emb_MD, owner_M, head, itm_k), itm_k=itm_k)
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


def itm_rerank_metrics(
    img_emb_ND: torch.Tensor,
    txt_emb_MD: torch.Tensor,
    txt_to_img_M: torch.Tensor,
    head,
    k: int,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int | None = None,
    budget_bytes: int = 256 << 20,
) -> dict:
    """Recall@k both ways after each query's top ``k`` candidates by similarity are re-ranked by the ITM head
    (``head``: its weights, ``itm.score``); a correct item outside the top ``k`` keeps its similarity rank
    (``itm.rerank_ranks``). Keys ``itm_image_to_text_R@1`` etc. Queries are processed ``chunk`` at a time, or as
    many as keep a chunk's similarities (and their masks) within ``budget_bytes``, as ``retrieval_metrics`` does."""
    img, txt = img_emb_ND.float(), txt_emb_MD.float()
    images = torch.arange(img.shape[0], device=img.device)

    def ranks_of(queries, query_owner, items, item_owner, pair):  # owner: the image a row is or belongs to
        rows = chunk or max(1, budget_bytes // (6 * max(items.shape[0], 1)))
        parts = []
        for s in range(0, queries.shape[0], rows):
            q, own = queries[s : s + rows], query_owner[s : s + rows, None] == item_owner[None, :]
            scored = lambda r, c, q=q: itm.score(*pair(q[r], items[c]), head)  # noqa: E731  (rows, columns -> logits)
            parts.append(itm.rerank_ranks(q @ items.T, own, scored, k))
        return torch.cat(parts)

    ranks = {
        "image_to_text": ranks_of(img, images, txt, txt_to_img_M, lambda q, c: (q, c)),
        "text_to_image": ranks_of(txt, txt_to_img_M, img, images, lambda q, c: (c, q)),
    }
    out = {}
    for name, r in ranks.items():
        for kk in ks:
            out[f"itm_{name}_R@{kk}"] = (r <= kk).double().mean().item()
        out[f"itm_{name}_mean_rank"] = r.double().mean().item()
    out["itm_mean_R@1"] = (out["itm_image_to_text_R@1"] + out["itm_text_to_image_R@1"]) / 2
    return out


def _thumbnails(res: dict, retrieval_cfg: RetrievalConfig) -> dict[int, str]:
    """{dataset position: data URI} of every image the examples show, read back from the eval set."""
    wanted = {i for ex in res.get("examples", []) for i in (ex["image"], *ex["top"])}
    wanted |= {ex["image"] for ex in res.get("caption_examples", [])}
    if not wanted:
        return {}
    source = eval_data.retrieval_source(res["dataset"], replace(retrieval_cfg, dataset=res["dataset"]))
    out = {}
    for index, load, _ in source.records():
        if index >= MAX_SCAN or len(out) == len(wanted):
            break
        if index in wanted and load is not None:
            try:
                img = Image.open(io.BytesIO(load())).convert("RGB")
            except Exception:
                continue
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out[index] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


def _read_thumbnails(res: dict, retrieval_cfg) -> dict[int, str]:
    try:
        return _thumbnails(res, retrieval_cfg)
    except Exception as err:  # the eval set moved or is remote and unreachable: the ranks still tell
        log.warning("report: retrieval thumbnails unavailable (%s)", err)
        return {}


def _captions(res: dict, thumbs: dict[int, str]) -> str:
    """A CoCa model's greedy captions of the first held-out images, beside their reference captions."""
    rows = []
    for ex in res["caption_examples"]:
        i = ex["image"]
        img = f'<img alt="image {i}" src="{thumbs[i]}">' if i in thumbs else f"<span>#{i}</span>"
        refs = "<br>".join(html.escape(r) for r in ex["references"])
        rows.append(f"<tr><td>{img}</td><th>{html.escape(ex['caption'])}</th><td><small>{refs}</small></td></tr>")
    return (
        f"<p>BLEU-4 {100 * res['caption_BLEU-4']:.1f}, CIDEr {100 * res['caption_CIDEr']:.1f} over "
        f"{res['caption_num_captioned']} images. The model's greedy caption, then the image's reference captions:</p>"
        f'<table class="examples"><tr><td></td><td>caption</td><td>references</td></tr>{"".join(rows)}</table>'
    )


def _examples(res: dict, thumbs: dict[int, str]) -> str:
    rows = []
    for ex in res.get("examples", []):
        cells = []
        for i in ex["top"]:
            mark = "hit" if i == ex["image"] else ""
            img = f'<img alt="image {i}" src="{thumbs[i]}">' if i in thumbs else f"<span>#{i}</span>"
            cells.append(f'<td class="{mark}">{img}</td>')
        own = ""
        if ex["image"] not in ex["top"]:
            i = ex["image"]
            img = f'<img alt="image {i}" src="{thumbs[i]}">' if i in thumbs else f"<span>#{i}</span>"
            own = f'<td class="gap">…</td><td class="own">{img}<br><small>its image</small></td>'
        rows.append(f"<tr><th>{html.escape(ex['caption'])}</th>{''.join(cells)}{own}</tr>")
    return (
        "<p>Caption queries (text to image): the five best-scoring images, left to right; the caption's own "
        'image has a <span class="hitlabel">green frame</span> (shown at the end when it is not among them).</p>'
        f'<table class="examples">{"".join(rows)}</table>'
    )


def _retrieval_cfg(run_config: dict) -> RetrievalConfig:
    """The run's ``eval.retrieval`` settings (columns, image root), for reading the thumbnails back."""
    try:
        section = (run_config.get("eval") or {}).get("retrieval") or {}
        names = RetrievalConfig.__dataclass_fields__
        return RetrievalConfig(**{k: v for k, v in section.items() if k in names})
    except Exception:
        return RetrievalConfig()
