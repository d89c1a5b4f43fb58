"""Distributed losses, distillation and gradient caching equal one process on the whole global batch (float64,
1e-6 rel.).

Each world size runs in its own group of gloo processes spawned here; every case compares the loss value and
every parameter's gradient (after DDP averaging), logit_scale and logit_bias included, against a plain
single-process computation. At world size 2 and 4 clipkit's losses are also compared with open_clip's exact
modes (ClipLoss with local_loss + gather_with_grad, SigLipLoss) on the same embeddings.
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.ranks import start_ranks
from tests.distributed.workers import CASES, COCA_CASES, DISTILL_CASES, ITM_CASES, loss_exactness
from tests.ports import free_port

TOL = 1e-6


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"loss-w{world}") / "results.json"
    start_ranks(loss_exactness, (world, free_port(), str(out)), nprocs=world)
    return world, json.loads(out.read_text())


@pytest.mark.parametrize("case", [c[0] for c in CASES + DISTILL_CASES + COCA_CASES + ITM_CASES])
def test_matches_single_process_global_batch(results, case):
    world, res = results
    r = res[case]
    assert r["missing_grads"] == []
    assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
    assert r["max_grad_rel_err"] <= TOL, r
    assert r["logit_scale_rel_err"] <= TOL, r
    if case.startswith("siglip"):
        assert r["logit_bias_rel_err"] <= TOL, r


@pytest.mark.parametrize("case", [c[0] for c in COCA_CASES])
def test_open_clip_caption_mean_is_not_the_global_batch_mean(results, case):
    """The reason clipkit counts the global batch's caption tokens: with ranks holding different numbers of
    tokens, open_clip's per-rank mean (with DDP's average over ranks) gives each rank's tokens another weight."""
    world, res = results
    if world == 1:
        pytest.skip("one process: the per-rank mean is the global one")
    assert res[case]["open_clip_caption_grad_rel_err"] > 0.1, res[case]


@pytest.mark.parametrize(
    "name",
    [
        "open_clip ClipLoss(local_loss, gather_with_grad)",
        "open_clip SigLipLoss",
        "open_clip DistillClipLoss (gathered)",
        "open_clip DistillClipLoss (tiled)",
    ],
)
def test_matches_open_clip_exact_modes(results, name):
    world, res = results
    if world == 1:
        pytest.skip("open_clip's distributed modes need a process group")
    r = res[name]
    assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
    assert r["max_grad_rel_err"] <= TOL, r


@pytest.mark.parametrize("loss_name", ["infonce", "siglip"])
def test_references_build_their_tensors_on_the_inputs_device(loss_name):
    """The GPU suite runs these references on CUDA (NCCL); a label or target made on the CPU would fail there.
    The ``meta`` device shows such a mismatch on a CPU-only machine."""
    import torch
    import torch.nn.functional as F

    from tests.distributed.workers import reference_distill, reference_loss

    def features():
        return F.normalize(torch.randn(5, 16, dtype=torch.float64), dim=-1).to("meta")

    out = {"image_features": features(), "text_features": features()}
    out["logit_scale"] = torch.tensor(10.0, dtype=torch.float64, device="meta")
    out["logit_bias"] = torch.tensor(-2.0, dtype=torch.float64, device="meta")
    assert reference_loss(out, loss_name).device.type == "meta"
    teacher = {**out, "image_features": features(), "text_features": features()}
    for kind in ("logits", "features"):
        assert reference_distill(out, teacher, kind).device.type == "meta"
