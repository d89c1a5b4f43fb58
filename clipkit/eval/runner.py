"""Runs the configured evaluations (``eval.zeroshot``, ``eval.retrieval`` and an ``eval.suite`` file) on a model,
on every rank of a job, with its raw and its EMA weights, and formats their results. The evaluators themselves
are plug-ins (``registry``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from clipkit import distributed
from clipkit.ema import SUFFIX as EMA_SUFFIX
from clipkit.engine.parts import autocast_dtype
from clipkit.eval.config import EvalConfig, EvalTask, load_eval_suite
from clipkit.eval.embedding import eval_transform
from clipkit.eval.registry import EvalContext, evaluator


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


def run_evals(built, cfg: EvalConfig, device: torch.device, demo_dir: Path | None, progress: bool = False) -> dict:
    """``{task name: metrics}`` on rank 0 ({} elsewhere). Every rank of a job must call it (collective)."""
    model = built.model
    was_training = model.training
    is_main = distributed.rank_and_world()[0] == 0
    results = {}
    for task in tasks_of(cfg):
        kind = evaluator(task.kind)
        task_cfg = task.cfg
        if task_cfg.dataset == "demo":
            if demo_dir is None:
                raise ValueError("the demo eval split needs the demo data")
            task_cfg = kind.with_demo(task_cfg, demo_dir / kind.demo_split)
        bar = tqdm(desc=f"eval {task.name}", unit="img", leave=False, disable=not (progress and is_main))
        ctx = EvalContext(
            built, eval_transform(model), device, cfg.batch_size, cfg.num_workers,
            autocast_dtype(cfg.precision, device), bar.update,
        )  # fmt: skip
        out = kind.run(ctx, task_cfg)
        bar.close()
        if out is not None:
            results[task.name] = {"task": task.kind, "dataset": task_cfg.dataset, **out}
    model.train(was_training)
    return results


def run_raw_and_ema(
    built,
    cfg: EvalConfig,
    device: torch.device,
    demo_dir: Path | None,
    raw_weights: Callable[[], contextlib.AbstractContextManager],
    ema_weights: Callable[[], contextlib.AbstractContextManager] | None,
    progress: bool = False,
) -> dict:
    """``run_evals`` with the raw weights, the EMA weights (results named ``NAME_ema``) or both, as
    ``eval.use_ema`` says; ``raw_weights`` / ``ema_weights`` put those weights in the model for a ``with`` block
    (``ema_weights`` None: there are none, and the raw weights are evaluated)."""
    use, results = cfg.use_ema, {}
    if ema_weights is None or use != "ema":
        with raw_weights():
            results = run_evals(built, cfg, device, demo_dir, progress)
    if ema_weights is not None and use != "raw":
        with ema_weights():
            averaged = run_evals(built, cfg, device, demo_dir, progress)
        results.update({f"{name}{EMA_SUFFIX}": res for name, res in averaged.items()})
    return results


def format_table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        label = "" if name == r.get("task") else f"{name}: "
        rows += evaluator(r["task"]).rows(label, r) if r.get("task") else []
        if r.get("skipped"):
            rows.append((f"{label}skipped", ", ".join(f"{k}: {v}" for k, v in r["skipped"].items())))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
