"""``train.stages``: the image tower at a stage's size computes what open_clip computes for a model built at that
size from the same weights (open_clip's own ``resize_pos_embed``, an independent implementation), and exactly its
own forward at the model's size; the carry-over at a switch; the loader's resize between steps; the config's
refusals, each naming ``train.stages``."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed
from open_clip.transformer import PatchDropout

from clipkit.config import RootConfig, validate
from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards
from clipkit.errors import ConfigError
from clipkit.model import build
from clipkit.model_config import ModelConfig
from clipkit.stage_config import Stage, parse_stages
from clipkit.stages import Stages, resize_grid


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build(ModelConfig()).model.eval()  # clipkit-tiny: 32 px, patch 8 (a 4 x 4 grid)
    with torch.no_grad():  # (a trained-looking embedding: smooth plus noise, not open_clip's small init)
        model.visual.positional_embedding.normal_()
    return model


def test_at_its_own_size_the_tower_computes_exactly_what_it_did():
    model = _model()
    images = torch.randn(4, 3, 32, 32)
    before = model.encode_image(images)
    Stages([Stage(0, 0, 5, 16, 0.0), Stage(1, 5, 10, 32, 0.0)], model)
    assert torch.equal(model.encode_image(images), before)


@pytest.mark.parametrize("size", [16, 24, 48])
def test_at_a_stage_size_it_is_open_clips_model_built_at_that_size(size):
    model = _model()
    Stages([Stage(0, 0, 5, size, 0.0), Stage(1, 5, 10, 32, 0.0)], model)
    reference = open_clip.create_model("clipkit-tiny", force_image_size=size).eval()
    weights = dict(model.state_dict())
    resize_pos_embed(weights, reference)  # open_clip's own interpolation, as when it loads weights at a new size
    reference.load_state_dict(weights)
    images = torch.randn(4, 3, size, size)
    torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6)


def test_the_switch_carries_the_stage_embedding_over_to_the_models_grid():
    model = _model()
    stages = Stages([Stage(0, 0, 5, 16, 0.5), Stage(1, 5, 10, 32, 0.0)], model)
    pos = model.visual.positional_embedding
    trained_at_16 = resize_grid(pos.detach().clone(), 4, 2)  # what stage 1's images saw
    shadow = pos.detach().clone() + 1  # (the EMA's copy)
    shadow_at_16 = resize_grid(shadow.clone(), 4, 2)
    stages.carry_over(stages.at(5), shadow)
    torch.testing.assert_close(pos.detach(), resize_grid(trained_at_16, 2, 4), rtol=0, atol=0)
    torch.testing.assert_close(shadow, resize_grid(shadow_at_16, 2, 4), rtol=0, atol=0)
    # the class token's embedding is kept; the grid's is now smooth (a 2 x 2 grid's content at 4 x 4)
    assert torch.equal(pos[0], trained_at_16[0])
    assert (stages.at(5).index, stages.at(6).index, stages.at(11).index) == (0, 1, 1)
    assert stages.switches_after(5) and not stages.switches_after(10) and not stages.switches_after(4)


def test_patch_dropout_follows_the_stage():
    model = _model()
    stages = Stages([Stage(0, 0, 5, 16, 0.5), Stage(1, 5, 10, 32, 0.0)], model)
    assert isinstance(model.visual.patch_dropout, PatchDropout)
    stages.enter(stages.at(1))
    model.train()
    tokens = model.visual._embeds(torch.randn(2, 3, 16, 16))
    assert tokens.shape[1] == 1 + 2  # the class token and half of the 2 x 2 grid
    stages.enter(stages.at(6))
    assert model.visual._embeds(torch.randn(2, 3, 32, 32)).shape[1] == 1 + 16


def test_the_loader_resizes_between_steps_and_keeps_the_samples(small_demo):
    spec = str(small_demo / "train" / "{00000..00003}.tar")

    def loader():
        shards, weights = resolve_shards(spec)
        decoder = SampleDecoder(("jpg", "png"), "json:captions", 32, (0.5, 1.0), 0)
        return TrainLoader(shards, weights, decoder, open_clip.get_tokenizer("clipkit-tiny"), mode="epoch",
                           seed=0, rank=0, world_size=1, num_workers=0, batch_size=32, window=64)  # fmt: skip

    plain, staged = loader(), loader()
    try:
        staged.set_image_size(16)
        first = [next(staged) for _ in range(3)]
        staged.set_image_size(32)
        later = [next(staged) for _ in range(3)]
        reference = [next(plain) for _ in range(6)]
    finally:
        plain.close()
        staged.close()
    assert [b["keys"] for b in first + later] == [b["keys"] for b in reference]
    assert all(b["image"].shape[-2:] == (16, 16) for b in first)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(later, reference[3:], strict=True))
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(first, reference[:3], strict=True))
    assert staged.decoder.image_size == 32


def _cfg(stages, steps=100, **model) -> RootConfig:
    cfg = RootConfig()
    cfg.train.steps, cfg.train.stages = steps, list(stages)
    cfg.model = ModelConfig(**model)
    return cfg


def test_stages_parse_with_rest_and_the_models_patch_dropout():
    got = parse_stages(["90:16:0.5", "rest:32"], 100, ModelConfig(patch_dropout=0.25))
    assert got == [Stage(0, 0, 90, 16, 0.5), Stage(1, 90, 100, 32, 0.25)]
    assert parse_stages(["90%:16:0.5", "rest:32"], 30, ModelConfig()) == [
        Stage(0, 0, 27, 16, 0.5),
        Stage(1, 27, 30, 32, 0.0),
    ]
    with pytest.raises(ConfigError, match="add up to 4, train.steps is 3.*rest"):  # (each at least 1 step)
        parse_stages(["90%:16", "10%:32"], 3, ModelConfig())
    assert parse_stages(["60:24", "40:32:0"], 100, ModelConfig()) == [
        Stage(0, 0, 60, 24, 0.0),
        Stage(1, 60, 100, 32, 0.0),
    ]


@pytest.mark.parametrize(
    "stages, model, why",
    [
        (["90:16", "20:32"], {}, "add up to 110, train.steps is 100"),
        (["90:16", "5:32"], {}, "add up to 95"),
        (["rest:16", "10:32"], {}, "only the last entry"),
        (["100:16", "rest:32"], {}, "take all 100 train.steps"),
        (["90:20", "rest:32"], {}, "multiple of the model's patch size 8"),
        (["90:16:1.5", "rest:32"], {}, "PATCH_DROPOUT must be in [0, 1)"),
        (["90-16", "rest:32"], {}, "is not STEPS:SIZE"),
        (["ninety:16", "rest:32"], {}, "'ninety' is not a number"),
        (["90:16", "rest:224"], {"name": "RN50"}, "needs an open_clip ViT image tower"),
    ],
)
def test_a_bad_stage_plan_is_refused_naming_the_field(stages, model, why):
    with pytest.raises(ConfigError, match="train.stages") as err:
        validate(_cfg(stages, **model))
    assert why in str(err.value)


def test_stages_run_on_ddp_and_fsdp_not_zero():
    cfg = _cfg(["90:16", "rest:32"])
    cfg.parallel.engine = "fsdp"
    validate(cfg, world_size=2)
    cfg.parallel.engine = "zero2"
    with pytest.raises(ConfigError, match="train.stages.*parallel=ddp or fsdp, not zero2"):
        validate(cfg, world_size=2)
