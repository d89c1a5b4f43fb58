"""loss.itm_weight through the real CLI: the ITM head trains, is checkpointed and re-ranks retrieval at eval; a run
killed with SIGKILL resumes bit-identically; two gradient-cached FSDP ranks whose loaders deliver the rows in
another order (workers) draw the same hard negatives and train what one process trains; exports leave the head out
and load in open_clip.

Same data and tolerance as test_engines.py: global batches of 48 of 96 pairs, float32, ATOL 1e-5."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.integration.test_engines import COMMON, STEPS, assert_same_training, final_weights, losses, torchrun

ITM = ["loss.itm_weight=0.5", "loss.itm_width=32"]
EVAL = ["eval.retrieval.dataset=demo", "eval.retrieval.itm_k=4"]
BASE = [o for o in COMMON if not o.startswith("eval.retrieval.dataset=")]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("itm") / "single"
    proc = run_cli("train", f"hydra.run.dir={run}", *BASE, *ITM, *EVAL, check=True)
    assert "ITM head: 384 -> 32 -> 1 on the embeddings (12,353 params)" in proc.stderr
    assert "top 4 re-ranked by ITM" in proc.stdout
    return run


def test_the_head_trains_is_checkpointed_and_reranks_retrieval(single):
    saved = final_weights(single)
    head = {k for k in saved if k.startswith("itm_head.")}
    assert head == {"itm_head.fc1.weight", "itm_head.fc1.bias", "itm_head.fc2.weight", "itm_head.fc2.bias"}
    assert saved["itm_head.fc1.weight"].shape == (32, 3 * 128)
    first = load_file(str(single / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert not torch.equal(first["itm_head.fc2.weight"], saved["itm_head.fc2.weight"])  # it trains
    result = json.loads((single / "summary.json").read_text())["eval"]["retrieval"]
    for d in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert 0 <= result[f"itm_{d}_R@{k}"] <= 1
        assert result[f"itm_{d}_R@10"] == result[f"{d}_R@10"]  # (re-ranking the top 4 moves nothing past 4)
    assert result["itm_k"] == 4
    # clipkit eval of the checkpoint gives the numbers the run's own final eval gave
    out = single / "eval.json"
    run_cli("eval", f"checkpoint={single}", *EVAL, f"eval.output={out}", "logging.progress=false", check=True)
    again = json.loads(out.read_text())["eval"]["retrieval"]
    assert {k: v for k, v in again.items() if k.startswith("itm_")} == pytest.approx(
        {k: v for k, v in result.items() if k.startswith("itm_")}, abs=1e-9
    )


def test_killed_run_resumes_bit_identically(single, tmp_path):
    run = tmp_path / "killed"
    args = ["train", f"hydra.run.dir={run}", *BASE, *ITM, *EVAL]
    killed = run_cli(*args, env={"CLIPKIT_FAULTS": "kill:step@7"})  # kill -9 after step 7 (checkpoint: 5)
    assert killed.returncode != 0
    resumed = run_cli(*args, check=True)
    assert "resumed from" in resumed.stderr and "step_00000005" in resumed.stderr
    assert losses(run) == losses(single)
    got, want = final_weights(run), final_weights(single)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_two_fsdp_ranks_with_workers_train_what_one_process_trains(single, tmp_path):
    """Each rank reads with 2 loader workers and caches gradients over micro-batches smaller than a worker's
    share of the step, so the workers' chunks interleave and the rows arrive in another order than one
    process's: the negatives are drawn by the rows' places in the canonical global batch, so they are the
    same ones (drawn by position, the losses differ). FSDP: the head sits in the root unit, and under gradient
    caching its weights get their gradient once. (DDP at world sizes 2 and 4: test_loss_exact.py.)"""
    run = tmp_path / "fsdp"
    torchrun(run, "parallel=fsdp", *ITM, "data.num_workers=2", "train.micro_batch_size=8")
    assert_same_training(run, single)


def test_export_leaves_the_head_out_and_loads_in_open_clip(single, tmp_path):
    out = tmp_path / "export"
    proc = run_cli("export", f"checkpoint={single}", "format=open_clip", f"out={out}", check=True)
    assert "max abs embedding difference image 0.00e+00, text 0.00e+00" in proc.stdout
    weights = load_file(str(out / "open_clip_model.safetensors"))
    assert not any(k.startswith("itm_head") for k in weights)
    model = open_clip.create_model(f"local-dir:{out}", output_dict=True)
    assert not hasattr(model, "itm_head")
    assert torch.equal(model.state_dict()["visual.conv1.weight"], final_weights(single)["visual.conv1.weight"])
    assert STEPS == 10
