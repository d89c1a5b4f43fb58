"""Zero-shot classification, with CLIP_benchmark's metric definitions, on any number of ranks (the ``zeroshot``
evaluator).

Class embeddings are the re-normalised mean of the normalised template embeddings (open_clip's
``build_zero_shot_classifier``), each rank building its share of the classes; logits are 100 x cosine; top-1,
top-5, mean per-class recall (balanced accuracy over the classes present) and each class's recall. Each rank
embeds its share of the images; rank 0 merges them in source order (``embedding``), so the metrics equal one
process's. Only rank 0 returns results; the other ranks return None.
"""

from __future__ import annotations

import html

import numpy as np
import open_clip
import torch

from clipkit import distributed
from clipkit.eval import data as eval_data
from clipkit.eval import prompts
from clipkit.eval.config import ZeroShotConfig
from clipkit.eval.embedding import autocast, embed_share, merge
from clipkit.eval.registry import EvalContext, Evaluator, register
from clipkit.figures import plain, png, subplots


@register
class ZeroShot(Evaluator):
    kind = "zeroshot"
    demo_split = "zeroshot"

    def with_demo(self, cfg: ZeroShotConfig, split):
        cfg = super().with_demo(cfg, split)
        cfg.classnames = cfg.classnames or str(split / "classnames.txt")
        cfg.templates = cfg.templates or str(split / "templates.txt")
        return cfg

    def run(self, ctx: EvalContext, cfg: ZeroShotConfig) -> dict | None:
        named = prompts.classnames(cfg.classnames) if cfg.classnames else None  # read once
        source = eval_data.classification_source(cfg.dataset, cfg, named)
        matched = eval_data.match_classnames(source.classnames, named, cfg.classnames, verbose=ctx.is_main)
        classnames = prompts.classnames(None, matched)
        templates = prompts.templates(cfg.templates, cfg.classnames)
        return zeroshot_classification(ctx, source, classnames, templates)

    def rows(self, label: str, res: dict) -> list[tuple[str, str]]:
        return [
            (f"{label}zero-shot top-1", f"{100 * res['acc1']:.1f}%"),
            (f"{label}zero-shot top-5", f"{100 * res['acc5']:.1f}%"),
            (f"{label}mean per-class recall", f"{100 * res['mean_per_class_recall']:.1f}%"),
            (
                f"{label}chance (top-1)",
                f"{100 * res['chance']:.1f}%  ({res['num_classes']} classes, {res['num_samples']} images)",
            ),
        ]

    def cards(self, name: str, res: dict) -> list[tuple[str, str]]:
        return [
            (f"{100 * res['acc1']:.1f}%", f"{name} top-1 ({res['num_classes']} classes)"),
            (f"{100 * res['acc5']:.1f}%", f"{name} top-5"),
        ]

    def curves(self, name: str, res: dict) -> dict[str, float]:
        return {f"{name} top-1": 100 * res["acc1"], f"{name} top-5": 100 * res["acc5"]}

    def report(self, name: str, res: dict, run_config: dict) -> list[str]:
        return [
            f"<h2>Zero-shot classification: {html.escape(name)}</h2>",
            f'<div class="sub">{html.escape(str(res.get("dataset", "")))}</div>',
            confusion_figure(res) if res.get("confusion") else recall_bars(res),
        ]


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
        with autocast(device, amp):
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


def zeroshot_classification(ctx: EvalContext, source, classnames: list[str], templates: list[str]) -> dict | None:
    model, device, amp = ctx.built.model, ctx.device, ctx.amp_dtype
    model.eval()
    rank, world = distributed.rank_and_world()
    classifier_DC = build_classifier(model, ctx.built.tokenizer, classnames, templates, device, amp)
    loader = eval_data.loader(source, ctx.transform, rank, world, ctx.batch_size, ctx.num_workers)
    shares = distributed.gather_to_main(embed_share(model, loader, device, amp, ctx.progress))
    if shares is None:
        return None
    img_emb_ND, labels, skips, _ = merge(shares)
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


def confusion_matrix(pred_N: torch.Tensor, labels_N: torch.Tensor, num_classes: int) -> list[list[int]]:
    """[true][predicted] counts."""
    flat = torch.bincount(labels_N * num_classes + pred_N, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()


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


def confusion_figure(res: dict) -> str:
    names, counts = [plain(n) for n in res["classnames"]], np.array(res["confusion"], dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.19 * len(names) + 2)
    fig, ax = subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("predicted class", fontsize=8)
    ax.set_ylabel("true class", fontsize=8)
    ax.set_title("zero-shot confusion (rows: fraction of each true class)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return png(fig)


def recall_bars(res: dict, n: int = 20) -> str:
    items = sorted(res["per_class_recall"].items(), key=lambda kv: kv[1])
    shown = items if len(items) <= 2 * n else items[:n] + items[-n:]
    fig, ax = subplots(figsize=(6, 0.18 * len(shown) + 1))
    ax.barh(range(len(shown)), [100 * v for _, v in shown], color="#2563eb")
    ax.set_yticks(range(len(shown)), [plain(k) for k, _ in shown], fontsize=6)
    ax.set_xlim(0, 100)
    what = "per-class recall (%)" if len(items) == len(shown) else f"per-class recall (%): worst and best {n}"
    ax.set_title(what, fontsize=10)
    ax.tick_params(labelsize=7)
    return png(fig)
