"""Short CLI runs of the loss variants, gradient caching and wandb (offline, no account)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMALL_DEMO, run_cli

SHORT = [
    *SMALL_DEMO,
    "train.steps=8",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "logging.progress=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
    "train.global_batch_size=64",
]


@pytest.mark.parametrize(
    "variant",
    [
        ["loss=siglip"],
        ["loss=infonce_tiled", "loss.chunk_size=16"],
        ["train.micro_batch_size=16"],  # gradient caching, K = 4
        ["loss=siglip", "train.micro_batch_size=32"],
    ],
    ids=["siglip", "tiled", "cache4", "siglip-cache2"],
)
def test_variant_trains(small_demo, tmp_path, variant):
    run_cli("train", f"hydra.run.dir={tmp_path}", *SHORT, *variant, check=True)
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["loss"] == r["loss"] for r in records)  # finite, logged every step
    if "loss=siglip" in variant:
        assert records[0]["logit_scale"] == pytest.approx(10.0, rel=0.05)  # initialised at log(10)


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
