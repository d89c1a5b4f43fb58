"""Evaluators are plug-ins: a kind defined outside clipkit (here, in this file) is found by an ``eval.suite`` entry,
run on a model, printed in the results table and given its report cards, without touching the runner."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from clipkit.data.writer import write_shard
from clipkit.eval import config as eval_config
from clipkit.eval import data as eval_data
from clipkit.eval.config import EvalConfig
from clipkit.eval.registry import EvalContext, Evaluator, evaluator, register
from clipkit.eval.runner import format_table, run_evals
from clipkit.model import build
from clipkit.model_config import ModelConfig
from tests.shardsets import COLOURS, jpeg


@dataclass
class CaptionLengthConfig:
    dataset: str = ""
    image_column: str = "image"
    caption_column: str = "caption"
    image_root: str | None = None
    split: str = "test"


@register
class CaptionLength(Evaluator):
    """A toy evaluator: the mean caption length of a retrieval set, and the mean norm of its image embeddings
    (so that it runs the model)."""

    kind = "caption_length_test"
    demo_split = "retrieval"

    def run(self, ctx: EvalContext, cfg: CaptionLengthConfig) -> dict | None:
        records = list(eval_data.retrieval_source(cfg.dataset, cfg).records())
        images = torch.stack([ctx.transform(Image.open(io.BytesIO(load())).convert("RGB")) for _, load, _ in records])
        with torch.no_grad():
            norm = ctx.built.model.encode_image(images.to(ctx.device)).norm(dim=-1).mean().item()
        words = [len(c.split()) for _, _, caps in records for c in caps]
        return {"mean_words": sum(words) / len(words), "image_norm": norm} if ctx.is_main else None

    def rows(self, label: str, res: dict) -> list[tuple[str, str]]:
        return [(f"{label}mean caption length", f"{res['mean_words']:.2f} words")]

    def cards(self, name: str, res: dict) -> list[tuple[str, str]]:
        return [(f"{res['mean_words']:.1f}", f"{name} words per caption")]


def test_an_evaluator_defined_elsewhere_runs_from_a_suite(tmp_path, monkeypatch):
    monkeypatch.setitem(eval_config.TASK_CONFIGS, CaptionLength.kind, CaptionLengthConfig)
    captions = ["a red square", "a big green circle", "blue"]
    samples = [
        {"__key__": f"k{i}", "jpg": jpeg(list(COLOURS.values())[i], seed=i), "txt": c} for i, c in enumerate(captions)
    ]
    write_shard(tmp_path / "00000.tar", samples)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"- name: lengths\n  task: {CaptionLength.kind}\n  dataset: {tmp_path / '00000.tar'}\n")
    cfg = EvalConfig(suite=str(suite))
    cfg.zeroshot.dataset = cfg.retrieval.dataset = ""
    cfg.validate(check_sources=False)
    torch.manual_seed(0)
    built = build(ModelConfig(), torch.device("cpu"))
    results = run_evals(built, cfg, torch.device("cpu"), None)
    assert results["lengths"]["mean_words"] == pytest.approx(8 / 3)
    assert results["lengths"]["task"] == CaptionLength.kind and results["lengths"]["image_norm"] > 0
    assert "lengths: mean caption length  2.67 words" in format_table(results)
    assert evaluator(CaptionLength.kind).cards("lengths", results["lengths"]) == [("2.7", "lengths words per caption")]


def test_an_unknown_kind_is_named():
    with pytest.raises(KeyError, match="no evaluator of kind 'nope'.*retrieval, zeroshot"):
        evaluator("nope")
