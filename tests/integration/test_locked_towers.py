"""LiT through the real CLI on every engine: an image tower loaded from `model.init_from` (image tower only) and
locked stays bit-identical to the file after 10 AdamW steps with weight decay, while the text tower trains to the
same parameters as one process (the engines' exactness with frozen parameters, gradient caching included).

Same data and tolerance as test_engines.py: global batches of 192 of 384 pairs, float32, ATOL 1e-5."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipkit.model import build
from clipkit.model_config import ModelConfig
from tests.conftest import run_cli
from tests.integration.test_engines import ATOL, COMMON, final_weights, logged, torchrun

LIT = ["model.lock_image=true", "model.init_towers=image", "optim.weight_decay=0.2"]
# "_cached": 2 micro-batches of 48 per rank (gradient caching; the locked tower is not re-forwarded). The default
# suite runs the sharded, gradient-cached case; `make test-all` every engine (~35 s each, kept out of `make test`'s
# 30 minutes).
ENGINES = [
    "fsdp_cached",
    pytest.param("ddp", marks=pytest.mark.slow),
    pytest.param("zero3", marks=pytest.mark.slow),
    pytest.param("zero2_cached", marks=pytest.mark.slow),
    pytest.param("zero1", marks=pytest.mark.slow),
    pytest.param("fsdp", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> tuple[str, dict]:
    """A "pretrained" model: clipkit-tiny at another seed, as a safetensors file (its image tower is what LiT
    keeps)."""
    torch.manual_seed(1234)
    weights = build(ModelConfig()).model.state_dict()
    path = tmp_path_factory.mktemp("lit") / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return str(path), load_file(str(path))


@pytest.fixture(scope="module")
def single(tower, tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("lit") / "single"
    proc = run_cli("train", f"hydra.run.dir={run}", *COMMON, *LIT, f"model.init_from={tower[0]}", check=True)
    assert "image tower locked (0.00M of 0.57M params trainable, eval mode)" in proc.stderr
    return run


def _check_lit(run, tower_weights: dict, ref_run=None) -> None:
    got = final_weights(run)
    image = [k for k in got if k.startswith("visual.")]
    assert image
    for name in image:
        assert torch.equal(got[name], tower_weights[name]), name  # locked: bit-identical, weight decay included
    moved = [k for k in got if not k.startswith("visual.") and not torch.equal(got[k], tower_weights[k])]
    assert "text_projection" in moved and "token_embedding.weight" in moved  # (the text tower trained)
    if ref_run is not None:
        ref = final_weights(ref_run)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
        assert logged(run, "grad_norm") == pytest.approx(logged(ref_run, "grad_norm"), rel=1e-4)


def test_locked_image_tower_is_untouched_in_one_process(single, tower):
    _check_lit(single, tower[1])
    engine = torch.load(single / "checkpoints" / "step_00000010" / "engine.pt", map_location="cpu", weights_only=True)
    trainable = [k for k in final_weights(single) if not k.startswith("visual.")]
    # AdamW state exists for the trainable parameters only (each has exp_avg and exp_avg_sq)
    assert len(engine["optimizer"]["state"]) == len(trainable)


@pytest.mark.parametrize("engine", ENGINES)
def test_locked_image_tower_on_every_engine(single, tower, tmp_path, engine):
    name, _, cached = engine.partition("_")
    extra = ["train.micro_batch_size=48"] if cached else []
    run = tmp_path / engine
    proc = torchrun(run, f"parallel={name}", *LIT, f"model.init_from={tower[0]}", *extra)
    assert "image tower locked" in proc.stderr
    _check_lit(run, tower[1], single)
