"""Evaluators run during and after training, and by ``clipkit eval``."""

from __future__ import annotations

from clipkit.eval.runner import format_table, run_evals

__all__ = ["format_table", "run_evals"]
