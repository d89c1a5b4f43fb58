"""Runs the configured evaluators on a model and formats their results."""

from __future__ import annotations

from pathlib import Path

import torch

from clipkit.config import EvalConfig
from clipkit.data import dir_spec
from clipkit.data.transforms import DeviceNormalize
from clipkit.eval.data import read_lines
from clipkit.eval.zeroshot import zeroshot_classification, zeroshot_retrieval


def _resolve(spec: str, demo_dir: Path | None, split: str) -> str:
    if spec != "demo":
        return spec
    if demo_dir is None:
        raise ValueError("the demo eval split needs the demo data")
    return dir_spec(demo_dir / split)


def run_evals(built, cfg: EvalConfig, device: torch.device, demo_dir: Path | None) -> dict:
    """``{"zeroshot": {...}, "retrieval": {...}}`` for the evaluators whose dataset is set."""
    model = built.model
    was_training = model.training
    normalize = DeviceNormalize(built.mean, built.std).to(device)
    results = {}
    if cfg.zeroshot.dataset:
        spec = _resolve(cfg.zeroshot.dataset, demo_dir, "zeroshot")
        default_dir = demo_dir / "zeroshot" if cfg.zeroshot.dataset == "demo" else None
        classnames = read_lines(cfg.zeroshot.classnames or default_dir / "classnames.txt")
        templates = read_lines(cfg.zeroshot.templates or default_dir / "templates.txt")
        results["zeroshot"] = zeroshot_classification(
            model, built.tokenizer, normalize, spec, classnames, templates, built.image_size, device, cfg.batch_size
        )
    if cfg.retrieval.dataset:
        spec = _resolve(cfg.retrieval.dataset, demo_dir, "retrieval")
        results["retrieval"] = zeroshot_retrieval(
            model, built.tokenizer, normalize, spec, built.image_size, device, cfg.batch_size
        )
    model.train(was_training)
    return results


def format_table(results: dict) -> str:
    rows = []
    if "zeroshot" in results:
        z = results["zeroshot"]
        rows += [
            ("zero-shot top-1", f"{100 * z['acc1']:.1f}%"),
            ("zero-shot top-5", f"{100 * z['acc5']:.1f}%"),
            ("mean per-class recall", f"{100 * z['mean_per_class_recall']:.1f}%"),
            ("chance (top-1)", f"{100 * z['chance']:.1f}%  ({z['num_classes']} classes, {z['num_samples']} images)"),
        ]
    if "retrieval" in results:
        r = results["retrieval"]
        for d in ("image_to_text", "text_to_image"):
            rows.append(
                (f"{d.replace('_', ' ')} R@1/5/10", " / ".join(f"{100 * r[f'{d}_R@{k}']:.1f}%" for k in (1, 5, 10)))
            )
        rows.append(("retrieval set", f"{r['num_images']} images, {r['num_texts']} captions"))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
