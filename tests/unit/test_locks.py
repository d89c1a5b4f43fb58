"""Locked towers (LiT): which parameters train, which modules stay in eval mode, what the optimizer holds.

The expected sets are written out here from open_clip's documented layer groups (embeddings, each block, the last
block with the final norm, the projection), not read back from the code under test."""

from __future__ import annotations

import json

import pytest
import torch

from clipkit.errors import ConfigError
from clipkit.model import apply_locks, build
from clipkit.model_config import ModelConfig, Towers
from clipkit.optim import build_optimizer, tower_of
from clipkit.optim_config import OptimConfig


def _built(**locks):
    cfg = ModelConfig(**locks)
    cfg.validate()
    model = build(cfg).model
    line = apply_locks(model, cfg)
    return model, line


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_locked_image_tower_gets_no_gradient_no_optimizer_state_and_stays_in_eval_mode():
    model, line = _built(lock_image=True, patch_dropout=0.5)
    names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == {n for n in names if not n.startswith("visual.")}
    assert "image tower locked (0.00M of 0.57M params trainable, eval mode)" in line

    model.train()  # what the training loop calls: the locked tower must not follow
    assert not any(m.training for m in model.visual.modules())
    assert all(m.training for m in model.transformer.modules())
    images, text = torch.rand(4, 3, 32, 32), torch.randint(0, 1000, (4, 16))
    a, b = model.encode_image(images), model.encode_image(images)
    assert torch.equal(a, b)  # patch dropout (on in train mode) is off in the locked tower
    assert not a.requires_grad  # no graph is built through the locked tower

    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(images, text)
    (out["image_features"] @ out["text_features"].T * out["logit_scale"]).logsumexp(1).mean().backward()
    optimizer.step()
    assert len(optimizer.state) == len(in_optimizer)  # AdamW state for trainable parameters only
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            assert param.grad is None and torch.equal(param, before[name]), name  # (weight decay included)
        else:
            assert param.grad is not None, name


def test_partial_unlock_follows_open_clips_groups_and_norm_freeze():
    # clipkit-tiny's image tower has 4 blocks: groups [embeddings], b0, b1, b2, [b3, ln_post], [proj].
    model, _ = _built(lock_image=True, lock_image_unlocked_groups=2)
    image = {n for n in _trainable(model) if n.startswith("visual.")}
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("visual.transformer.resblocks.3.", "visual.ln_post."))
    }
    assert image == expected | {"visual.proj"}
    model.train()
    assert model.visual.training  # a partly unlocked tower trains in train mode

    model, _ = _built(lock_image=True, lock_image_unlocked_groups=2, lock_image_norm=True)
    image = {n for n in _trainable(model) if n.startswith("visual.")}
    assert image == {n for n in expected | {"visual.proj"} if ".ln_" not in n and not n.startswith("visual.ln_")}
    model.train()
    norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and not any(m.training for m in norms)

    # Text (1 block): groups [token + positional embeddings], [b0, ln_final], [text_projection].
    model, _ = _built(lock_text=True, lock_text_unlocked_layers=2)
    text = {n for n in _trainable(model) if tower_of(n) == "text"}
    assert text == {
        n for n, _ in model.named_parameters() if n.startswith(("transformer.resblocks.0.", "ln_final."))
    } | {"text_projection"}
    assert {n for n in _trainable(model) if tower_of(n) == "image"} == {
        n for n, _ in model.named_parameters() if n.startswith("visual.")
    }


def test_fully_locked_text_tower_stays_in_eval_mode_unless_asked():
    model, _ = _built(lock_text=True)
    model.train()
    assert not model.transformer.training and model.visual.training
    assert {n for n in _trainable(model)} == {n for n, _ in model.named_parameters() if tower_of(n) != "text"}
    model, line = _built(lock_text=True, lock_train_mode=True)
    model.train()
    assert model.transformer.training and "train mode" in line


TIMM_TINY = {
    "embed_dim": 64,
    "vision_cfg": {
        "timm_model_name": "resnet18",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 64,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.mark.parametrize("tower", ["RN50", "timm"])
def test_resnet_image_towers_lock_with_frozen_batch_norm_statistics(tower, tmp_path):
    """open_clip's ModifiedResNet (RN50) and a timm trunk (resnet18): open_clip's own lock, BatchNorm statistics
    frozen with model.lock_image_norm."""
    if tower == "timm":
        pytest.importorskip("timm")
        path = tmp_path / "timm-resnet18-tiny.json"
        path.write_text(json.dumps(TIMM_TINY))
        model, _ = _built(config=str(path), lock_image=True, lock_image_norm=True, lock_train_mode=True)
        size = 64
    else:
        model, _ = _built(name="RN50", lock_image=True, lock_image_norm=True, lock_train_mode=True)
        size = 224
    assert not any(p.requires_grad for p in model.visual.parameters())
    model.train()  # (train mode asked for: the norms stay frozen all the same)
    bns = [m for m in model.visual.modules() if "BatchNorm" in type(m).__name__]
    assert bns and not any(m.training for m in bns)
    stats = [b.running_mean.clone() for b in bns]
    model.encode_image(torch.rand(2, 3, size, size) * 3)
    assert all(torch.equal(b.running_mean, s) for b, s in zip(bns, stats, strict=True))  # stats do not move

    unfrozen, _ = (
        _built(name="RN50", lock_image=True, lock_train_mode=True)
        if tower == "RN50"
        else _built(config=str(path), lock_image=True, lock_train_mode=True)
    )
    unfrozen.train()
    bn = next(m for m in unfrozen.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    unfrozen.encode_image(torch.rand(2, 3, size, size) * 3)
    assert not torch.equal(bn.running_mean, before)  # the control: without the freeze they do move


@pytest.mark.parametrize(
    ("locks", "field"),
    [
        ({"lock_image_unlocked_groups": 1}, "model.lock_image_unlocked_groups"),
        ({"lock_text_norm": True}, "model.lock_text_norm"),
        ({"lock_image": True, "lock_image_unlocked_groups": -1}, "model.lock_image_unlocked_groups"),
        ({"lock_image": True, "lock_text": True}, "model.lock_text"),
        ({"init_towers": Towers.image}, "model.init_towers"),  # (an enum, as Hydra hands it over)
    ],
)
def test_bad_lock_settings_name_the_field(locks, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**locks).validate()
    assert err.value.key == field
    assert "Towers" not in str(err.value)  # a choice prints as typed (model.init_towers='image'), not as an enum
