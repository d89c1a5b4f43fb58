"""model.lora: the attention rebuilt for adapters computes what nn.MultiheadAttention computes; the adapters sit
where the config says, with the parameter count LoRA's definition gives; merging them leaves a plain open_clip
model with the adapted model's outputs; a checkpoint keeps all but the frozen weights, and their digest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipkit import lora
from clipkit.errors import ConfigError
from clipkit.model import build
from clipkit.model_config import LoraConfig, ModelConfig

# clipkit-tiny: image tower 4 blocks of width 128, MLP ratio 2; text tower 1 block of width 64, MLP ratio 4
IMAGE = {"in_proj": (128, 384), "out_proj": (128, 128), "c_fc": (128, 256), "c_proj": (256, 128)}
TEXT = {"in_proj": (64, 192), "out_proj": (64, 64), "c_fc": (64, 256), "c_proj": (256, 64)}


def _adapters(rank: int, shapes: dict, layers=("in_proj", "out_proj", "c_fc", "c_proj")) -> int:
    """LoRA's parameter count: r x (in + out) per adapted linear layer (A is r x in, B is out x r)."""
    return sum(rank * (shapes[k][0] + shapes[k][1]) for k in layers)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    built = build(ModelConfig())
    return built.model.eval(), built.tokenizer


def _inputs(tokenizer):
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32), tokenizer(["a photo of a cat", "a dog", "a long caption of many words here"])


def _randomise_adapters(model) -> None:
    """Fresh adapters leave the output unchanged (B = 0); a trained one has B != 0."""
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_projected_attention_computes_what_multihead_attention_does(batch_first, causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first)
    x = torch.randn(5, 7, 64, requires_grad=True)
    length = 7 if batch_first else 5
    mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    projected = lora.ProjectedAttention(mha)
    y = x.detach().clone().requires_grad_(True)
    got = projected(y, y, y, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(y.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projected.in_proj.weight.grad, mha.in_proj_weight.grad, atol=1e-5, rtol=1e-5)
    back = projected.to_mha()
    assert set(dict(back.named_parameters())) == set(dict(mha.named_parameters()))
    for name, p in back.named_parameters():
        assert torch.equal(p, dict(mha.named_parameters())[name]), name


def test_adapters_sit_where_the_config_says_with_loras_parameter_count():
    model, _ = _model()
    line = lora.apply(model, LoraConfig(rank=4))
    adapters = {n: p.numel() for n, p in model.named_parameters() if ".lora_" in n}
    assert sum(adapters.values()) == 4 * _adapters(4, IMAGE) + _adapters(4, TEXT)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters) | {"logit_scale"}  # both towers adapted: nothing else of them trains
    assert "0.029M adapter params" in line

    model, _ = _model()
    lora.apply(model, LoraConfig(rank=2, towers="image", targets=["mlp"], blocks=1))
    adapters = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert adapters == {
        f"visual.transformer.resblocks.3.mlp.{layer}.lora_{ab}.default.weight"
        for layer in ("c_fc", "c_proj")
        for ab in "AB"
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    text = {n for n, _ in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"}
    assert text and text <= trainable  # the tower without adapters trains as it would without LoRA
    assert not any(n.startswith("visual.") and ".lora_" not in n for n in trainable)
    assert isinstance(model.visual.transformer.resblocks[3].attn, nn.MultiheadAttention)  # (attn not targeted)


def test_a_locked_tower_beside_the_adapted_one_stays_locked():
    from clipkit.model import apply_locks

    model, _ = _model()
    cfg = ModelConfig(lock_text=True, lora=LoraConfig(rank=4, towers="image"))
    apply_locks(model, cfg)
    lora.apply(model, cfg.lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n} | {"logit_scale"}


def test_merged_model_is_plain_open_clip_with_the_adapted_outputs():
    model, tokenizer = _model()
    plain = copy.deepcopy(model)
    images, text = _inputs(tokenizer)
    lora.apply(model, LoraConfig(rank=4, alpha=8))
    _randomise_adapters(model)
    with torch.no_grad():
        adapted = model(images, text)
        base = plain(images, text)
    assert (adapted["image_features"] - base["image_features"]).abs().max() > 1e-2  # the adapters act

    merged = lora.merged(model)
    assert not lora.is_adapted(merged)
    assert {n: tuple(t.shape) for n, t in merged.state_dict().items()} == {
        n: tuple(t.shape) for n, t in plain.state_dict().items()
    }
    assert not any("peft" in type(m).__module__ or isinstance(m, lora.ProjectedAttention) for m in merged.modules())
    with torch.no_grad():
        out = merged(images, text)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key], adapted[key], atol=1e-6, rtol=1e-5)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.equal(merged.state_dict()["visual.conv1.weight"], plain.state_dict()["visual.conv1.weight"])


def test_merge_is_w_plus_scaled_b_a():
    model, _ = _model()
    plain = copy.deepcopy(model)
    lora.apply(model, LoraConfig(rank=4, alpha=8, targets=["mlp"]))
    _randomise_adapters(model)
    layer = model.visual.transformer.resblocks[2].mlp.c_fc
    delta = 8 / 4 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    merged = lora.merged(model).state_dict()["visual.transformer.resblocks.2.mlp.c_fc.weight"]
    want = plain.state_dict()["visual.transformer.resblocks.2.mlp.c_fc.weight"] + delta
    torch.testing.assert_close(merged, want, atol=1e-6, rtol=0)


def test_checkpoint_keeps_all_but_the_frozen_weights_and_loads_back():
    model, tokenizer = _model()
    lora.apply(model, LoraConfig(rank=4))
    _randomise_adapters(model)
    saved = lora.saved_weights(model, model.state_dict())
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}  # (no buffers in this model)

    other, _ = _model()
    lora.apply(other, LoraConfig(rank=4))
    lora.load_saved(other, {k: v.clone() for k, v in saved.items()}, "test")
    images, text = _inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(other(images, text)["image_features"], model(images, text)["image_features"])
    with pytest.raises(ConfigError, match="missing"):
        lora.load_saved(other, {k: v for k, v in saved.items() if k != "logit_scale"}, "test")

    digest = lora.base_digest(other)
    assert lora.base_digest(model) == digest  # adapters differ; the frozen weights do not
    with torch.no_grad():
        other.visual.conv1.weight[0, 0, 0, 0] += 1e-3
    assert lora.base_digest(other) != digest


def test_a_model_without_adapters_saves_everything():
    model, _ = _model()
    state = model.state_dict()
    assert lora.saved_weights(model, state) is state
    assert lora.apply(model, LoraConfig()) is None and not lora.is_adapted(model)
