"""The teacher's inputs: the student's crop at the teacher's size and normalisation, its own tokens when its
tokenizer differs (the loader tokenises each caption twice), nothing extra when the teacher reads what the
student reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from clipkit.distill import Teacher
from clipkit.distill_config import DistillConfig
from clipkit.distributed import DistEnv
from clipkit.model import build
from clipkit.model_config import ModelConfig
from tests.integration.test_distill import TEACHER_CFG


@pytest.fixture(scope="module")
def student():
    return build(ModelConfig())


def _teacher_folder(tmp_path, model_cfg: dict, mean=None, std=None):
    """An exported open_clip folder (the format `clipkit export` writes and open_clip loads)."""
    import open_clip

    from clipkit.model import quiet_root_logger

    (tmp_path / "t.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "t.json")
    torch.manual_seed(3)
    with quiet_root_logger():
        model = open_clip.create_model("t")
    pre = {"size": model_cfg["vision_cfg"]["image_size"], "mean": mean or list(open_clip.OPENAI_DATASET_MEAN),
           "std": std or list(open_clip.OPENAI_DATASET_STD)}  # fmt: skip
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_a_teacher_with_the_students_preprocessing_reads_the_students_inputs(student, tmp_path):
    from clipkit.model import _register_shipped

    _register_shipped()
    import open_clip

    folder = _teacher_folder(tmp_path, open_clip.get_model_config("clipkit-tiny"))
    teacher = Teacher(DistillConfig(teacher=str(folder)), student, torch.device("cpu"))
    assert not teacher.resize and not teacher.renormalize and not teacher.own_tokens and teacher.tokenizer is None
    images, text = torch.randn(4, 3, 32, 32), student.tokenizer(["a red circle"] * 4)
    out = teacher(images, text)
    ref = teacher.model(images, text)
    assert torch.equal(out["image_features"], ref["image_features"])
    assert out["image_features"].requires_grad is False and out["logit_scale"].dim() == 0


def test_another_size_mean_and_tokenizer_get_their_own_preprocessing(student, tmp_path):
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    folder = _teacher_folder(tmp_path, TEACHER_CFG, mean, std)
    teacher = Teacher(DistillConfig(teacher=str(folder)), student, torch.device("cpu"))
    assert teacher.resize and teacher.renormalize and teacher.own_tokens
    # a uniform colour stays that colour through the resize, and is normalised with the teacher's statistics
    colour = torch.tensor([0.3, 0.6, 0.9]).reshape(1, 3, 1, 1)
    s_mean, s_std = torch.tensor(student.mean).reshape(1, 3, 1, 1), torch.tensor(student.std).reshape(1, 3, 1, 1)
    images = ((colour - s_mean) / s_std).expand(2, 3, 32, 32)
    pixels = teacher.images(images)
    assert pixels.shape == (2, 3, 40, 40)
    want = ((colour - 0.5) / 0.25).expand(2, 3, 40, 40)
    torch.testing.assert_close(pixels, want, atol=1e-5, rtol=0)
    tokens = teacher.tokenizer(["a red circle", "x " * 40])
    assert tokens.shape == (2, 20)  # the teacher's context length, not the student's 16
    out = teacher(images, student.tokenizer(["a", "b"]), tokens)
    assert out["image_features"].shape == (2, 96) and out["text_features"].shape == (2, 96)


def test_the_loader_tokenises_each_caption_for_the_teacher_too(student, small_demo, tmp_path):
    from clipkit.config import RootConfig
    from clipkit.train import build_loader

    folder = _teacher_folder(tmp_path, TEACHER_CFG)
    teacher = Teacher(DistillConfig(teacher=str(folder)), student, torch.device("cpu"))
    cfg = RootConfig()
    cfg.data.num_workers = 0
    cfg.data.cache_dir = str(small_demo.parent)
    cfg.data.demo.num_train, cfg.data.demo.num_zeroshot, cfg.data.demo.num_retrieval = 2000, 360, 200
    cfg.data.demo.shard_size = 600
    cfg.train.global_batch_size = 8
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader, _ = build_loader(cfg, student, env, small_demo, teacher.tokenizer)
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert batch["text"].shape == (8, 16) and batch["teacher_text"].shape == (8, 20)
    short = batch["text"][:, -1] == 0  # captions that fit the student's 16 tokens: the same ids, padded to 20
    assert short.any()
    assert torch.equal(batch["teacher_text"][short, :16], batch["text"][short])
    assert (batch["teacher_text"][short, 16:] == 0).all()
