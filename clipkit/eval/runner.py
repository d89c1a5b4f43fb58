"""Runs the configured evaluators (``eval.zeroshot``, ``eval.retrieval`` and an ``eval.suite`` file) on a model,
on every rank of a job, and formats their results."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from clipkit import distributed
from clipkit.data import dir_spec
from clipkit.engine.parts import autocast_dtype
from clipkit.eval import prompts
from clipkit.eval.config import EvalConfig, EvalTask, load_eval_suite
from clipkit.eval.data import match_classnames, open_source
from clipkit.eval.zeroshot import zeroshot_classification, zeroshot_retrieval


@dataclass
class EvalOptions:
    batch_size: int
    num_workers: int
    amp_dtype: torch.dtype | None


def tasks_of(cfg: EvalConfig) -> list[EvalTask]:
    out = []
    if cfg.zeroshot.dataset:
        out.append(EvalTask("zeroshot", "zeroshot", cfg.zeroshot))
    if cfg.retrieval.dataset:
        out.append(EvalTask("retrieval", "retrieval", cfg.retrieval))
    if cfg.suite:
        out += load_eval_suite(cfg.suite)
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"eval task names must be unique: {names}")
    return out


def _resolve_demo(task: EvalTask, demo_dir: Path | None) -> EvalTask:
    if task.cfg.dataset != "demo":
        return task
    if demo_dir is None:
        raise ValueError("the demo eval split needs the demo data")
    split = demo_dir / ("zeroshot" if task.kind == "zeroshot" else "retrieval")
    cfg = replace(task.cfg, dataset=dir_spec(split))
    if task.kind == "zeroshot":
        cfg = replace(
            cfg,
            classnames=cfg.classnames or str(split / "classnames.txt"),
            templates=cfg.templates or str(split / "templates.txt"),
        )
    return replace(task, cfg=cfg)


def eval_transform(model):
    """open_clip's own eval preprocessing for this model (resize short side, centre crop, normalise)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def run_evals(built, cfg: EvalConfig, device: torch.device, demo_dir: Path | None, progress: bool = False) -> dict:
    """``{task name: metrics}`` on rank 0 ({} elsewhere). Every rank of a job must call it (collective)."""
    model = built.model
    was_training = model.training
    transform = eval_transform(model)
    opts = EvalOptions(cfg.batch_size, cfg.num_workers, autocast_dtype(cfg.precision, device))
    results = {}
    for task in tasks_of(cfg):
        task = _resolve_demo(task, demo_dir)
        bar = tqdm(desc=f"eval {task.name}", unit="img", leave=False, disable=not (progress and _is_main()))
        if task.kind == "zeroshot":
            c = task.cfg
            named = prompts.classnames(c.classnames) if c.classnames else None  # read once
            source = open_source("zeroshot", c.dataset, c, named)
            matched = match_classnames(source.classnames, named, c.classnames, verbose=_is_main())
            classnames = prompts.classnames(None, matched)
            templates = prompts.templates(c.templates, c.classnames)
            out = zeroshot_classification(
                model, built.tokenizer, source, transform, classnames, templates, device, opts, bar.update
            )
        else:
            source = open_source("retrieval", task.cfg.dataset, task.cfg)
            captioner = _captioner(built) if hasattr(model, "text_decoder") else None  # CoCa: captions too
            out = zeroshot_retrieval(model, built.tokenizer, source, transform, device, opts, bar.update, captioner)
        bar.close()
        if out is not None:
            results[task.name] = {"task": task.kind, "dataset": task.cfg.dataset, **out}
    model.train(was_training)
    return results


def _captioner(built):
    """images -> greedy captions. Under several ranks every rank decodes the same number of steps (a sharded
    model's forward is a collective), not stopping early when its own captions have all ended."""
    from clipkit.caption import decode, greedy_captions

    synchronous = distributed.rank_and_world()[1] > 1
    return lambda images: decode(built.tokenizer, greedy_captions(built.model, images, synchronous=synchronous))


def _is_main() -> bool:
    return distributed.rank_and_world()[0] == 0


def format_table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        label = "" if name == r.get("task") else f"{name}: "
        if r.get("task") == "zeroshot":
            rows += [
                (f"{label}zero-shot top-1", f"{100 * r['acc1']:.1f}%"),
                (f"{label}zero-shot top-5", f"{100 * r['acc5']:.1f}%"),
                (f"{label}mean per-class recall", f"{100 * r['mean_per_class_recall']:.1f}%"),
                (
                    f"{label}chance (top-1)",
                    f"{100 * r['chance']:.1f}%  ({r['num_classes']} classes, {r['num_samples']} images)",
                ),
            ]
        elif r.get("task") == "retrieval":
            if "caption_CIDEr" in r:
                rows.append(
                    (
                        f"{label}captioning BLEU-4 / CIDEr",
                        f"{100 * r['caption_BLEU-4']:.1f} / {100 * r['caption_CIDEr']:.1f}",
                    )
                )
            for d in ("image_to_text", "text_to_image"):
                rows.append(
                    (
                        f"{label}{d.replace('_', ' ')} R@1/5/10",
                        " / ".join(f"{100 * r[f'{d}_R@{k}']:.1f}%" for k in (1, 5, 10)),
                    )
                )
            rows.append((f"{label}retrieval set", f"{r['num_images']} images, {r['num_texts']} captions"))
            for ex in r.get("caption_examples", []):
                rows.append(
                    (
                        f"{label}caption of image {ex['image']}",
                        f"{ex['caption']!r}  (a reference: {ex['references'][0]!r})",
                    )
                )
        if r.get("skipped"):
            rows.append((f"{label}skipped", ", ".join(f"{k}: {v}" for k, v in r["skipped"].items())))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
