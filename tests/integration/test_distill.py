"""Distillation through the real CLI: a teacher with its own image size and its own tokenizer (another context
length) trained first, then a clipkit-tiny student distilled from its run dir; one process and a sharded engine
with gradient caching train the same parameters (the teacher computed once per micro-batch, in the no-grad pass).

Same data and tolerance as test_engines.py (global batches of 48 of 96 pairs, float32, ATOL 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from tests.integration.test_engines import ATOL, COMMON, MICRO2, final_weights, logged, torchrun

TEACHER_CFG = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 40, "layers": 2, "width": 96, "head_width": 32, "patch_size": 8, "mlp_ratio": 2},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("distill")
    config = root / "teacher-40px.json"
    config.write_text(json.dumps(TEACHER_CFG))
    run = root / "teacher"
    run_cli("train", f"hydra.run.dir={run}", *COMMON, f"model.config={config}", "train.steps=3", check=True)
    return run


@pytest.fixture(scope="module")
def single(teacher, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "single"
    proc = run_cli("train", f"hydra.run.dir={run}", *COMMON, f"distill.teacher={teacher}", check=True)
    return run, proc.stderr


def test_the_teacher_gets_its_own_image_size_and_tokenizer(single):
    _, log = single
    assert "distilling from" in log and "(logits, weight 1)" in log
    assert "its own image size 40" in log and "its own tokenizer" in log


def test_distillation_changes_training_and_the_loss_includes_the_term(single, tmp_path):
    run, _ = single
    plain = tmp_path / "plain"
    run_cli("train", f"hydra.run.dir={plain}", *COMMON, check=True)
    with_teacher, without = logged(run, "loss"), logged(plain, "loss")
    assert all(torch.isfinite(torch.tensor(with_teacher)))
    # the first step's loss is the same contrastive term plus a positive distillation term (a cross-entropy)
    assert with_teacher[0] > without[0]
    assert not torch.equal(final_weights(run)["text_projection"], final_weights(plain)["text_projection"])


def test_a_sharded_engine_with_gradient_caching_distils_to_the_same_parameters(single, teacher, tmp_path):
    run, _ = single
    other = tmp_path / "fsdp"
    torchrun(other, "parallel=fsdp", MICRO2, f"distill.teacher={teacher}")
    got, ref = final_weights(other), final_weights(run)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
    assert logged(other, "grad_norm") == pytest.approx(logged(run, "grad_norm"), rel=1e-4)


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (["distill.teacher=/nowhere/run"], "distill.teacher", "path not found"),
        (["distill.teacher=ViT-B-32"], "distill.pretrained", "local weights"),
        (["distill.weight=0", "distill.teacher=ViT-B-32", "distill.pretrained=/etc/hostname"], "distill.weight", "> 0"),
        (["distill.pretrained=/etc/hostname"], "distill.pretrained", "needs distill.teacher"),
    ],
)
def test_bad_distillation_settings_are_named_before_anything_starts(overrides, key, says, tmp_path):
    proc = run_cli("train", f"hydra.run.dir={tmp_path / 'r'}", *overrides)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and says in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_feature_distillation_needs_the_same_width(teacher, tmp_path):
    proc = run_cli("train", f"hydra.run.dir={tmp_path / 'r'}", f"distill.teacher={teacher}", "distill.kind=features")
    assert proc.returncode == 2 and "distill.kind" in proc.stderr and "(96)" in proc.stderr, proc.stderr
