"""LiT through the real CLI on every engine: an image tower loaded from `model.init_from` (image tower only) and
locked stays bit-identical to the file after 10 AdamW steps with weight decay, while the text tower trains to the
same parameters as one process (the engines' exactness with frozen parameters, gradient caching included).

Same data and tolerance as test_engines.py: global batches of 48 of 96 pairs, float32, ATOL 1e-5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.integration.test_engines import ATOL, COMMON, MICRO2, final_weights, logged, losses, torchrun

LIT = ["model.lock_image=true", "model.init_towers=image", "optim.weight_decay=0.2"]
# "_cached": 2 micro-batches of 12 per rank (gradient caching; the locked tower is not re-forwarded). The default
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
    extra = [MICRO2] if cached else []
    run = tmp_path / engine
    proc = torchrun(run, f"parallel={name}", *LIT, f"model.init_from={tower[0]}", *extra)
    assert "image tower locked" in proc.stderr
    _check_lit(run, tower[1], single)


FULL_IMAGE = [*LIT, "data.crop_scale_min=1"]  # (no augmentation: what cached features need)
CACHED = [*FULL_IMAGE, "data.cache_image_features=true"]


def _cached_summary(run, kind: str = "image") -> dict:
    return json.loads((run / "summary.json").read_text())["cached_features"][kind]


def test_cached_image_features_train_as_the_images_do(tower, tmp_path):
    """data.cache_image_features: one process reading the cache trains the run that reads the images (same
    losses, same weights); two DDP ranks with gradient caching build a cache of their own (each rank its shards,
    the workers decoding) and match it too; a cached run killed (SIGKILL) at step 7 resumes to the same losses."""
    init = f"model.init_from={tower[0]}"
    images, cached, ddp, halves = (tmp_path / name for name in ("images", "cached", "ddp", "halves"))
    one = tmp_path / "cache-one"
    run_cli("train", f"hydra.run.dir={images}", *COMMON, *FULL_IMAGE, init, check=True)
    proc = run_cli("train", f"hydra.run.dir={cached}", *COMMON, *CACHED, init, f"data.feature_cache_dir={one}",
                   check=True)  # fmt: skip
    assert "cached image features: 3 of 3 shards" in proc.stderr
    summary = _cached_summary(cached)
    assert summary | {"seconds": 0, "gb": 0} == {
        "shards": 3, "done": 3, "embedded": 3, "failed": 0, "rows": 96, "bad": 0, "seconds": 0, "gb": 0,
        "folder": summary["folder"],
    }  # fmt: skip
    assert 96 * 128 * 4 < summary["gb"] * 1e9 < 96 * 128 * 4 + 50_000  # (clipkit-tiny's 128-wide rows in float32,
    # then the keys and the files' headers)
    assert losses(cached) == pytest.approx(losses(images), rel=1e-6, abs=0)
    _check_lit(cached, tower[1], images)

    two = tmp_path / "cache-two"
    torchrun(ddp, "parallel=ddp", *CACHED, init, MICRO2, "data.num_workers=1",
             f"data.feature_cache_dir={two}")  # fmt: skip
    assert _cached_summary(ddp)["embedded"] == 3 and _cached_summary(ddp)["rows"] == 96
    _check_lit(ddp, tower[1], images)
    (folder_one,), (folder_two,) = one.iterdir(), two.iterdir()  # (the same tower and settings: one folder name)
    assert folder_one.name == folder_two.name
    for path in folder_one.glob("*.npy"):
        built_by_two = np.load(folder_two / path.name)
        if path.name.endswith(".keys.npy"):
            assert built_by_two.tolist() == np.load(path).tolist()
        else:
            np.testing.assert_allclose(built_by_two, np.load(path), rtol=0, atol=1e-6)

    again = ["train", f"hydra.run.dir={halves}", *COMMON, *CACHED, init, f"data.feature_cache_dir={one}"]
    killed = run_cli(*again, env={"CLIPKIT_FAULTS": "kill:step@7"})  # kill -9 after step 7 (checkpoint: 5)
    assert killed.returncode != 0 and "(0 embedded now" in killed.stderr  # (the first run's cache, reused)
    run_cli(*again, check=True)
    by_step = {r["step"]: r["loss"] for r in map(json.loads, (halves / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}  # fmt: skip
    assert [by_step[s] for s in sorted(by_step)] == losses(cached)


def test_cached_text_and_teacher_features_train_as_the_towers_do(single, tmp_path):
    """data.cache_text_features (a locked text tower: one row per distinct caption of every sample) and
    data.cache_teacher_features (the teacher's two towers; the LiT run above as the teacher): one process reading
    the caches trains the run that tokenises, decodes and runs the towers (same losses, same weights)."""
    cases = {
        "text": ["model.lock_text=true", "data.cache_text_features=true"],
        "teacher": [f"distill.teacher={single}", "data.crop_scale_min=1", "data.cache_teacher_features=true"],
    }
    for name, (*setting, switch) in cases.items():
        plain, cached = tmp_path / f"{name}-plain", tmp_path / f"{name}-cached"
        run_cli("train", f"hydra.run.dir={plain}", *COMMON, *setting, check=True)
        cache = f"data.feature_cache_dir={tmp_path / 'cache'}"
        proc = run_cli("train", f"hydra.run.dir={cached}", *COMMON, *setting, switch, cache, check=True)
        kinds = ["text"] if name == "text" else ["teacher_image", "teacher_text"]
        for kind in kinds:
            assert f"cached {kind} features: 3 of 3 shards" in proc.stderr
            assert _cached_summary(cached, kind)["embedded"] == 3
        assert losses(cached) == pytest.approx(losses(plain), rel=1e-6, abs=0), name
        ref, got = final_weights(plain), final_weights(cached)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=0, msg=f"{name}: {key}")
    rows = _cached_summary(tmp_path / "text-cached", "text")["rows"]
    assert 96 < rows < 4 * 96  # (the demo's 4 captions per image, the same caption written once per shard)
