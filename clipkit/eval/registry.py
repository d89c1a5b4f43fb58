"""Evaluators as plug-ins. Each kind of evaluation (``zeroshot``, ``retrieval``) is one module that defines an
``Evaluator`` and registers it under its kind; the runner, the results table and the run report find it there
and know no kind by name.

A new evaluator touches: its module (what it computes on any number of ranks, its table rows, its report
section), its config dataclass in ``eval/config.py`` (``TASK_CONFIGS``: configs are checked before torch is
imported), its module's name in ``BUILTIN`` below, and its test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from clipkit import distributed
from clipkit.data import dir_spec

BUILTIN = ("clipkit.eval.zeroshot", "clipkit.eval.retrieval")
_EVALUATORS: dict[str, Evaluator] = {}


@dataclass
class EvalContext:
    """What every evaluator runs with: the model (``built``: model, tokenizer), open_clip's eval transform for
    it, the device, the eval batch size, loader workers per rank and autocast dtype, and a progress callback
    (records done)."""

    built: Any
    transform: Callable
    device: torch.device
    batch_size: int
    num_workers: int
    amp_dtype: torch.dtype | None
    progress: Callable[[int], None] | None = None

    @property
    def is_main(self) -> bool:
        return distributed.rank_and_world()[0] == 0


class Evaluator:
    """One kind of evaluation. ``run`` is a collective (every rank calls it; rank 0 gets the metrics, the others
    None); the other methods turn rank 0's metrics into the results table, report cards, eval curves and a
    report section."""

    kind: ClassVar[str]
    demo_split: ClassVar[str]  # the embedded demo data's folder this kind evaluates on (``dataset=demo``)

    def with_demo(self, cfg, split: Path):
        """``cfg`` with ``dataset=demo`` resolved to the demo's split folder."""
        return replace(cfg, dataset=dir_spec(split))

    def run(self, ctx: EvalContext, cfg) -> dict | None:
        raise NotImplementedError

    def rows(self, label: str, res: dict) -> list[tuple[str, str]]:
        """(what, value) rows of the printed results table; ``label`` prefixes a named task's rows."""
        return []

    def cards(self, name: str, res: dict) -> list[tuple[str, str]]:
        """(value, caption) headline figures at the top of the run report."""
        return []

    def curves(self, name: str, res: dict) -> dict[str, float]:
        """{series: value in %} points of the report's eval-over-steps plot."""
        return {}

    def report(self, name: str, res: dict, run_config: dict) -> list[str]:
        """HTML parts of the report's section for this task (``run_config``: the run's config.yaml, parsed)."""
        return []


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: makes ``cls`` the evaluator of ``cls.kind``."""
    _EVALUATORS[cls.kind] = cls()
    return cls


def evaluator(kind: str) -> Evaluator:
    """The registered evaluator of ``kind`` (the built-in modules register when first asked for)."""
    if kind not in _EVALUATORS:
        for module in BUILTIN:  # (plug-in discovery: a module registers its evaluator when imported)
            importlib.import_module(module)
    if kind not in _EVALUATORS:
        raise KeyError(f"no evaluator of kind {kind!r} (known: {', '.join(sorted(_EVALUATORS))})")
    return _EVALUATORS[kind]
