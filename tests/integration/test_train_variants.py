"""Short CLI runs of the loss variants, gradient caching and wandb (offline, no account)."""

from __future__ import annotations

import json
import math
import shlex

import pytest

from tests.conftest import SMALL_DEMO, run_cli

SHORT = [
    *SMALL_DEMO,
    "train.steps=8",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
    "train.global_batch_size=64",
    "data.num_workers=0",  # (tests/conftest.py IN_PROCESS_DATA: the loader is not this file's subject)
]


def _losses(run_dir) -> list[float]:
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.fixture(scope="module")
def references(small_demo, tmp_path_factory) -> dict:
    """The plain runs: gathered InfoNCE and SigLIP, whole batch, no caching."""
    out = {}
    for name, extra in (("infonce", []), ("siglip", ["loss=siglip"])):
        run = tmp_path_factory.mktemp(f"ref-{name}")
        run_cli("train", f"hydra.run.dir={run}", *SHORT, *extra, check=True)
        out[name] = _losses(run)
        assert sum(out[name][-3:]) < sum(out[name][:3]) - 0.3, out[name]  # it learns
    return out


@pytest.mark.parametrize(
    "variant,reference",
    [
        (["loss=infonce_tiled", "loss.chunk_size=16"], "infonce"),
        (["train.micro_batch_size=16"], "infonce"),  # gradient caching, K = 4
        (["loss=siglip", "train.micro_batch_size=32"], "siglip"),
    ],
    ids=["tiled", "cache4", "siglip-cache2"],
)
def test_variant_reproduces_the_plain_run(small_demo, tmp_path, references, variant, reference):
    """Tiling and gradient caching change memory, not mathematics: the loss curve equals the plain run's (to
    float32 summation order) step by step, so a wrong gradient (a factor K, a lost term) shows at step 2."""
    run_cli("train", f"hydra.run.dir={tmp_path}", *SHORT, *variant, check=True)
    assert _losses(tmp_path) == pytest.approx(references[reference], rel=1e-4)
    if "loss=siglip" in variant:
        first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        assert first["logit_scale"] == pytest.approx(10.0, rel=0.05)  # initialised at log(10)


def test_wandb_offline_needs_no_account(small_demo, tmp_path):
    run_cli(
        "train",
        f"hydra.run.dir={tmp_path}",
        *SHORT,
        "logging.wandb=true",
        check=True,
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""},
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_caption_sources_mixed_as_typed(small_demo, tmp_path):
    """``data.captions`` as a user quotes it: the demo's first caption (txt) and its caption list (json:captions), a
    quarter and three quarters; summary.json counts the samples trained with each."""
    line = " ".join([f"hydra.run.dir={tmp_path}", *SHORT, "'data.captions=[txt@0.25,json:captions@0.75]'"])
    proc = run_cli("train", *shlex.split(line), check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    sources = summary["caption_sources"]
    assert set(sources) == {"txt", "json:captions"} and sum(sources.values()) == 8 * 64, (sources, proc.stderr)
    assert 0.15 < sources["txt"] / 512 < 0.35, sources  # 3 sigma of 512 draws at 0.25: 0.057
