"""`clipkit bench`: clipkit's step and open_clip_train's own step, back to back, on the same batches."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_bench_reports_both_trainers(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", f"hydra.run.dir={tmp_path}", "bench.steps=3", "bench.warmup=1", f"bench.output={out}", check=True
    )
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"clipkit", "open_clip"}
    for row in result["results"].values():
        assert row["samples_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_mem_gb"] > 0  # (MFU is a fraction)
    assert result["peak_kind"] == "measured fp32 matmul peak" and result["forward_gflops_per_sample"] > 0
    assert result["speedup"] > 0 and "clipkit / open_clip samples/s" in proc.stdout
    assert set(result["fed"]) == {"clipkit", "open_clip"} and "open_clip was fed: float32 images" in proc.stdout


def test_bench_on_training_data_without_baseline(small_demo, tmp_path):
    from tests.conftest import SMALL_DEMO

    out = tmp_path / "bench.json"
    run_cli(
        "bench",
        *SMALL_DEMO,
        "bench.data=train",
        "bench.baseline=false",
        "bench.steps=2",
        "bench.warmup=1",
        f"bench.output={out}",
        f"hydra.run.dir={tmp_path}",
        check=True,
    )
    assert set(json.loads(out.read_text())["results"]) == {"clipkit"}


def test_bench_of_a_coca_model_runs_both_trainers_with_the_captioning_loss(tmp_path):
    """clipkit's step with its CaptionLoss, open_clip_train's with CoCaLoss (before: its ClipLoss got the
    decoder's logits and labels and failed)."""
    out = tmp_path / "bench.json"
    run_cli(
        "bench",
        "model=coca_tiny",
        "train.global_batch_size=16",
        "bench.steps=2",
        "bench.warmup=1",
        f"bench.output={out}",
        f"hydra.run.dir={tmp_path}",
        check=True,
    )
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"clipkit", "open_clip"}
    assert all(row["samples_per_s"] > 0 for row in result["results"].values())
