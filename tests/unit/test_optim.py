"""Parameter groups: weight decay follows open_clip's trainer, so its published recipes reproduce."""

from __future__ import annotations

import copy

import pytest
import torch

from clipkit.model import build
from clipkit.model_config import ModelConfig
from clipkit.optim import build_optimizer, param_groups
from clipkit.optim_config import OptimConfig


def _no_decay_names(model, optimizer) -> set[str]:
    ids = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_groups_match_open_clip_train_for_vit_b32():
    model = build(ModelConfig(name="ViT-B-32")).model
    # open_clip_train/main.py, written out here: what its optimizer exempts from weight decay
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    expected = {n for n, p in model.named_parameters() if exclude(n, p)}
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.2), torch.device("cpu"))
    assert _no_decay_names(model, optimizer) == expected
    assert {"positional_embedding", "token_embedding.weight", "visual.positional_embedding"}.isdisjoint(expected)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    optimizer = build_optimizer(
        model, OptimConfig(weight_decay=0.2, exclude_embeddings_from_decay=True), torch.device("cpu")
    )
    extra = _no_decay_names(model, optimizer) - expected
    assert extra == {"positional_embedding", "token_embedding.weight", "visual.positional_embedding"}


def _lr_of(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_layer_decay_and_tower_settings_for_vit_b32():
    """optim.image.layer_decay / optim.text.lr / optim.text.weight_decay, read back from the optimizer's groups
    of a ViT-B/32 (12 blocks per tower): every parameter in exactly one group, at the lr its layer and tower
    give, written out independently of clipkit's grouping code."""
    from clipkit.optim import build_scheduler, scheduled_lr
    from clipkit.optim_config import OptimConfig, TowerOptimConfig

    model = build(ModelConfig(name="ViT-B-32")).model
    cfg = OptimConfig(
        lr=1e-3,
        weight_decay=0.2,
        image=TowerOptimConfig(layer_decay=0.75),
        text=TowerOptimConfig(lr=1e-4, weight_decay=0.05),
    )
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)
    assert len({id(p) for g in optimizer.param_groups for p in g["params"]}) == len(params)
    lr, wd = _lr_of(optimizer), {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}

    def expected_image_lr(name: str) -> float:
        if name.startswith("visual.transformer.resblocks."):
            return 1e-3 * 0.75 ** (12 - int(name.split(".")[3]))  # block i: 0.75^(12 - i)
        if name in ("visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"):
            return 1e-3  # after the blocks: the full lr
        return 1e-3 * 0.75**13  # conv1, class and positional embedding, ln_pre

    for name, p in params.items():
        if name.startswith("visual."):
            assert lr[id(p)] == pytest.approx(expected_image_lr(name), rel=1e-12), name
            assert wd[id(p)] == (0.0 if p.ndim < 2 or "ln" in name or "bias" in name else 0.2), name
        elif name in ("logit_scale",):
            assert lr[id(p)] == 1e-3 and wd[id(p)] == 0.0
        else:  # the text tower: its own lr and weight decay, no layer decay
            assert lr[id(p)] == pytest.approx(1e-4, rel=1e-12), name
            assert wd[id(p)] == (0.0 if p.ndim < 2 or "ln" in name or "bias" in name else 0.05), name
    # The schedule scales every group alike; the logged lr stays optim.lr's.
    scheduler = build_scheduler(optimizer, cfg, total_steps=100)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    factor = scheduler.get_last_lr()[0] / scheduler.base_lrs[0]
    for name, p in params.items():
        want = expected_image_lr(name) if name.startswith("visual.") else (1e-3 if name == "logit_scale" else 1e-4)
        assert _lr_of(optimizer)[id(p)] == pytest.approx(want * factor, rel=1e-12), name
    assert scheduled_lr(scheduler, cfg.lr) == pytest.approx(1e-3 * factor, rel=1e-12)


def test_layer_decay_on_a_tower_without_numbered_blocks_is_refused():
    from clipkit.optim_config import OptimConfig, TowerOptimConfig

    model = build(ModelConfig(name="RN50")).model  # ModifiedResNet image tower
    with pytest.raises(ValueError, match=r"optim.image.layer_decay=0.8 needs an open_clip transformer tower"):
        build_optimizer(model, OptimConfig(image=TowerOptimConfig(layer_decay=0.8)), torch.device("cpu"))


def test_warmup_stable_decay_schedule():
    """optim.schedule=wsd: linear warmup, the peak, then a linear decay over the last decay_fraction of the steps
    that would reach min_lr one update after the last (no update is spent at the floor)."""
    from clipkit.optim import lr_factor

    cfg = OptimConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    factors = [lr_factor(step, cfg, total_steps=100) for step in range(100)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10:80] == [1.0] * 70
    assert factors[80:] == pytest.approx([1 - 0.9 * i / 20 for i in range(20)])
    assert factors[-1] == pytest.approx(0.1 + 0.9 / 20)
    with pytest.raises(ValueError, match="optim.decay_fraction"):
        OptimConfig(decay_fraction=0).validate()


def test_cpu_update_is_torchs_fused_adamw_and_steps_like_the_reference():
    """On a CPU torch's default AdamW is its per-parameter loop; clipkit asks for the fused kernel (6x faster for
    the demo model's update), which must still be AdamW: within float rounding of torch's reference loop."""
    torch.manual_seed(0)
    model = build(ModelConfig(name="clipkit-tiny")).model
    twin = copy.deepcopy(model)
    cfg = OptimConfig(lr=7e-4, weight_decay=0.2)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True
    # The same groups (clipkit's own), stepped by torch's reference loop.
    loop = torch.optim.AdamW(
        param_groups(twin, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
    )
    assert loop.defaults["fused"] is None
    start = model.visual.conv1.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        optimizer.step()
        loop.step()
    apart = max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert apart < 1e-6
    assert (model.visual.conv1.weight - start).abs().max() > 1e-3  # (the five steps of 7e-4 did move it)


def _grads(model, gen, nan: bool = False) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    if nan:
        next(model.parameters()).grad.view(-1)[0] = float("nan")


def test_masked_adamw_is_torchs_adamw_and_skips_where_the_device_flag_says():
    """train.compile=step's update (``masked_adamw_``, the learning rate a tensor the schedule fills in place)
    against torch's fused AdamW with its ``found_inf``: the same parameters, moments and step counts within float
    rounding over 6 warmup steps, one of them non-finite (nothing applied by either)."""
    from clipkit.optim import build_scheduler, hold_lr_as_tensors, init_adamw_state, masked_adamw_

    torch.manual_seed(0)
    model = build(ModelConfig(name="clipkit-tiny")).model
    twin = copy.deepcopy(model)
    cfg = OptimConfig(lr=7e-4, weight_decay=0.2, warmup_steps=4)
    fused, masked = build_optimizer(model, cfg, torch.device("cpu")), build_optimizer(twin, cfg, torch.device("cpu"))
    schedules = build_scheduler(fused, cfg, 10), build_scheduler(masked, cfg, 10)
    hold_lr_as_tensors(masked, torch.device("cpu"))
    init_adamw_state(masked)
    gen, twin_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(6):
        _grads(model, gen, nan=step == 3)
        _grads(twin, twin_gen, nan=step == 3)
        before = [p.detach().clone() for p in twin.parameters()]
        finite = torch.isfinite(torch.stack([p.grad.norm() for p in model.parameters()]).norm())
        fused.found_inf = (~finite).float()
        fused.step()
        masked_adamw_(masked, finite)
        if step == 3:
            assert all(torch.equal(a, p) for a, p in zip(before, twin.parameters(), strict=True))
        for schedule in schedules:
            schedule.step()
        assert float(masked.param_groups[0]["lr"]) == pytest.approx(fused.param_groups[0]["lr"], rel=1e-6)
    apart = max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert apart < 1e-6
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        a, b = fused.state[p], masked.state[q]
        assert float(a["step"]) == float(b["step"]) == 5.0
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=1e-6, atol=1e-9)
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("first,then", [(True, False), (False, True)])
def test_an_update_checkpoint_resumes_under_the_other_compile_setting(first, then):
    """train.compile may differ on resume: the optimizer state of the traced update (tensor learning rates) loads
    into the fused one and back, and 3 + 2 steps across the switch equal 5 steps without it."""
    from clipkit.config import RootConfig
    from clipkit.engine.parts import TorchUpdate

    cfg = RootConfig()
    cfg.optim.warmup_steps, cfg.train.steps = 3, 10
    torch.manual_seed(0)
    base = build(ModelConfig(name="clipkit-tiny")).model
    straight, switched = copy.deepcopy(base), copy.deepcopy(base)
    cpu = torch.device("cpu")
    reference = TorchUpdate(straight, cfg, cpu, None)
    update = TorchUpdate(switched, cfg, cpu, None, traced=first)
    gen, twin_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for step in range(5):
        if step == 3:
            state = update.state_dict()
            update = TorchUpdate(switched, cfg, cpu, None, traced=then)
            update.load_state_dict(copy.deepcopy(state))
            assert isinstance(update.optimizer.param_groups[0]["lr"], torch.Tensor) == then
        _grads(straight, gen)
        _grads(switched, twin_gen)
        reference.step()
        update.step()
        assert update.lr == pytest.approx(reference.lr)
    apart = max((p - q).abs().max().item() for p, q in zip(straight.parameters(), switched.parameters(), strict=True))
    assert apart < 1e-6
