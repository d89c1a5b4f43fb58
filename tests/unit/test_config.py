"""Config mistakes fail up front: one line naming the dotted field and the value, exit code 2."""

from __future__ import annotations

import pytest

from clipkit.cli import main
from tests.conftest import run_cli

CACHED = ["data.cache_image_features=true", "model.lock_image=true", "data.crop_scale_min=1"]
BAD_CONFIGS = [
    # (overrides, text the one-line message must contain)
    (["train.stepz=10"], "train.stepz"),  # unknown key
    (["train.steps=abc"], "train.steps"),  # wrong type
    (["train.steps=0"], "train.steps=0"),  # zero size
    (["train.global_batch_size=-8"], "train.global_batch_size=-8"),  # negative size
    (["optim.lr=-1"], "optim.lr"),
    (["data.num_workers=-2"], "data.num_workers=-2"),
    (["train.global_batch_size=100", "train.micro_batch_size=30"], "train.global_batch_size=100"),  # indivisible
    (["model.name=ViT-Nope-99"], "model.name='ViT-Nope-99'"),  # unknown model
    (["model=nope"], "model/nope"),  # unknown preset
    (["data.train=/nonexistent/{000..009}.tar"], "data.train"),  # missing shards
    (["model.pretrained=laion2b_s34b_b79k"], "model.pretrained"),  # hub tag instead of a local file
    (["model.name=hf-hub:timm/ViT-B-16-SigLIP"], "model.name"),  # hub model
    (["train.precision=fp8"], "train.precision='fp8'"),  # bad choice
    (["data.stall_timeout_s=-1"], "data.stall_timeout_s=-1.0"),
    (["data.train=s3://bucket/{0..9}.tar", "data.allow_pipe=false", "data.train=pipe:cat x"], "data.train"),
    (["data.crop_scale_min=1.5"], "data.crop_scale_min"),
    (["optim.beta2=1.0"], "optim.beta2"),
    (["eval.zeroshot.classnames=/nonexistent.txt"], "eval.zeroshot.classnames"),
    (["data.mode=shuffled"], "data.mode"),
    (["notakeyvalue"], "notakeyvalue"),
    (["loss.name=siglip"], "model.init_logit_bias"),  # SigLIP without a learnable bias
    (["loss=siglip", "loss.impl=tiled"], "loss.impl='tiled'"),  # meaningless combination
    (["loss.chunk_size=-5"], "loss.chunk_size='-5'"),
    (["loss.impl=ring"], "loss.impl='ring'"),
    (["train.global_batch_size=128", "train.micro_batch_size=48"], "train.global_batch_size=128"),  # K not integral
    (["parallel=zero4"], "parallel/zero4"),  # unknown engine preset
    (["parallel.engine=fsdp1"], "parallel.engine='fsdp1'"),
    (["parallel.offload_optimizer=true"], "parallel.offload_optimizer"),  # offload without DeepSpeed
    (["parallel=zero2", "parallel.offload_params=true"], "parallel.offload_params"),  # param offload needs zero3
    (["parallel=zero2", "train.precision=fp16"], "train.precision='fp16'"),
    (["parallel=zero3", "train.micro_batch_size=32"], "train.micro_batch_size=32"),  # caching under zero3
    (["parallel.timeout_s=0"], "parallel.timeout_s=0"),
    (["parallel=zero2", "train.compile=true"], "train.compile='model'"),  # compile: ddp and fsdp only
    (["parallel=fsdp", "train.compile=step"], "train.compile='step'"),  # the whole step: ddp only
    (["train.compile=step", "train.micro_batch_size=32"], "train.compile='step'"),  # one micro-batch per step
    (["train.compile=step", "train.precision=fp16"], "train.compile='step'"),  # the scaler decides on the host
    (["train.compile=yes"], "train.compile='yes'"),
    (["eval.retrieval.dataset=holdout"], "eval.retrieval.dataset='holdout'"),  # nothing held out
    (["eval.zeroshot.dataset=holdout"], "eval.zeroshot.dataset='holdout'"),  # captions are not labels
    (["data.holdout_fraction=1.5"], "data.holdout_fraction=1.5"),
    (["optim.image.layer_decay=1.5"], "optim.image.layer_decay=1.5"),
    (["optim.text.lr=0"], "optim.text.lr=0"),
    (["data.holdout_fraction=0.1"], "data.holdout_fraction=0.1"),  # the demo has its own held-out splits
    (["parallel=fsdp", "train.channels_last=true"], "train.channels_last=True"),
    # issue 32: values that looked valid to a `> 0` check, and nonsense that used to build for minutes or train
    # somewhere other than asked
    (["optim.lr=inf"], "optim.lr=inf"),
    (["optim.eps=inf"], "optim.eps=inf"),
    (["data.prefetch_factor=100000"], "data.prefetch_factor=100000"),
    (["data.shuffle_window=1000000000"], "data.shuffle_window=1000000000"),
    (["train.seed=-1"], "train.seed=-1"),
    (["train.global_batch_size=1000000000000"], "train.global_batch_size=1000000000000"),
    (["train.device=gpu"], "train.device='gpu'"),
    (["embed.images=false", "embed.texts=false"], "embed.images=False"),
    # issue 30: a layout the canonical streams do not admit, and streams that do not divide the global batch
    (["data.num_workers=3"], "data.num_workers=3"),  # the 64 streams of a batch of 128 do not split 3 ways
    (["data.streams=48"], "data.streams=48"),
    # issue 31: cached tower features only where they are what the tower would compute, and nothing else needs pixels
    (["data.cache_image_features=true", "data.crop_scale_min=1"], "model.lock_image=true"),
    (["data.cache_image_features=true", "model.lock_image=true"], "data.crop_scale_min=0.9"),  # augmentation on
    (CACHED + ["model.lock_train_mode=true"], "model.lock_train_mode=false"),
    (CACHED + ["model.lock_image_unlocked_groups=1"], "(none unlocked)"),
    (["data.cache_text_features=true"], "model.lock_text=true"),
    (["data.cache_teacher_features=true", "data.crop_scale_min=1"], "needs a teacher (distill.teacher)"),
    (CACHED + ["model.name=clipkit-coca-tiny"], "caption decoder"),
    (CACHED + ["train.stages=[50%:32,rest:32]"], "train.stages"),
    # issue 31: image-text matching
    (["loss.itm_weight=-1"], "loss.itm_weight=-1.0: must be >= 0"),
    (["loss.itm_weight=1", "loss.itm_width=-2"], "loss.itm_width=-2: must be >= 0"),
    (["loss.itm_weight=1", "eval.retrieval.itm_k=-1"], "eval.retrieval.itm_k=-1: must be >= 0"),
    (["loss.itm_weight=1", "loss.contrastive_weight=0"], "ITM's negatives need it"),
    (["loss.itm_weight=1", "train.global_batch_size=1", "data.streams=1"], "hard negatives come from the rest"),
]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_fails_with_named_field(overrides, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("clipkit: config error:"), err
    assert needle in err, err


LORA_REFUSED = [
    # issue 31: LoRA adapts pretrained weights, on the engines whose checkpoints can leave the frozen ones out
    ([], "model.lora.rank=4: adapts pretrained weights"),  # (no model.init_from or model.pretrained)
    (["model.lock_image=true"], "model.lock_image=True: the image tower has LoRA adapters"),
    (["model.lock_text=true", "model.lora.towers=text"], "model.lock_text=True"),
    (["parallel=zero2"], "parallel.engine='zero2'"),
    (["model.name=clipkit-coca-tiny"], "not CoCa"),
    (["train.stages=[50%:32,rest:32]"], "train.stages"),
    (["model.lora.targets=[mlp,mlp]"], "names a layer twice"),
    (["model.lora.targets=[qkv]"], "expected one of [attn, mlp]"),
    (["model.lora.alpha=0"], "model.lora.alpha=0"),
    (["model.lora.rank=-1"], "model.lora.rank=-1"),
    (["model.lora.dropout=1"], "model.lora.dropout=1"),
    (["model.lora.blocks=-2"], "model.lora.blocks=-2"),
]


@pytest.mark.parametrize("overrides,needle", LORA_REFUSED, ids=[" ".join(o) for o, _ in LORA_REFUSED])
def test_bad_lora_config_fails_with_named_field(overrides, needle, tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"")  # (validation reads no weights)
    with pytest.raises(SystemExit) as exc:
        main(["train", "model.lora.rank=4", *([f"model.init_from={base}"] if overrides else []), *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipkit: config error:"), err
    assert needle in err, err


def test_bench_refuses_lora_instead_of_timing_the_full_step(tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["bench", "model.lora.rank=8", f"model.init_from={base}"])
    err = capsys.readouterr().err
    assert "model.lora.rank=8: clipkit bench times full training steps" in err, err


def test_bench_refuses_itm(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "loss.itm_weight=1"])
    err = capsys.readouterr().err
    assert "loss.itm_weight=1.0: clipkit bench times full training steps" in err, err


def test_lora_without_peft_installed_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["train", "model.lora.rank=8", f"model.init_from={base}"])
    err = capsys.readouterr().err
    assert "model.lora.rank=8: needs peft: pip install 'clipkit[lora]'" in err, err


def test_starting_from_a_lora_run_is_refused_with_the_export_to_use(tmp_path, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "lora.json").write_text("{}")
    (step / "model.safetensors").write_bytes(b"")
    for start in (tmp_path / "run", step, step / "model.safetensors"):  # the run, a checkpoint, its weights file
        with pytest.raises(SystemExit):
            main(["train", f"model.init_from={start}"])
        err = capsys.readouterr().err
        assert "model.init_from=" in err and "is a LoRA run" in err and "clipkit export" in err, (start, err)


def test_bad_config_in_a_subprocess_has_no_traceback():
    proc = run_cli("train", "train.steps=abc", timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "train.steps" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unknown_verb_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2 and "unknown verb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "clipkit VERB" in capsys.readouterr().out


def test_world_size_enters_divisibility_check(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exc:
        main(["train", "train.global_batch_size=128"])
    assert exc.value.code == 2 and "3 x" in capsys.readouterr().err


def test_world_size_the_streams_do_not_admit_is_refused_with_the_ones_they_do(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exc:
        main(["train", "train.global_batch_size=96", "data.streams=32"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "data.streams=32" in err and "[1, 2, 4, 8, 16, 32]" in err, err


def test_defaults_and_presets_compose():
    from clipkit.cli import compose
    from clipkit.config import RootConfig, validate

    cfg, run_dir = compose([])
    assert isinstance(cfg, RootConfig) and cfg.model.name == "clipkit-tiny" and cfg.data.train == "demo"
    assert str(run_dir) == "runs/demo"
    validate(cfg)
    cfg, run_dir = compose(["model=vit_b16", "hydra.run.dir=/tmp/x", "train.steps=7"])
    assert cfg.model.name == "ViT-B-16" and cfg.train.steps == 7 and str(run_dir) == "/tmp/x"
    for preset, name in [("vit_b32", "ViT-B-32"), ("vit_l14", "ViT-L-14"), ("tiny", "clipkit-tiny")]:
        assert compose([f"model={preset}"])[0].model.name == name


def test_compile_takes_the_words_users_type(tmp_path):
    """train.compile=false|true|model|step reach the field as words (Hydra reads bare false/true as booleans);
    ``true`` is the whole-model compile it meant before ``step`` existed, and a run dir saved then (a YAML bool)
    still loads."""
    from clipkit.cli import compose
    from clipkit.config import saved_config

    typed = {word: compose([f"train.compile={word}"])[0].train.compile for word in ("false", "true", "model", "step")}
    assert typed == {"false": "false", "true": "model", "model": "model", "step": "step"}
    (tmp_path / "config.yaml").write_text("train:\n  compile: true\n")
    assert saved_config(tmp_path).train.compile == "model"
    (tmp_path / "config.yaml").write_text("train:\n  compile: false\n")
    assert saved_config(tmp_path).train.compile == "false"


def test_shards_preset_requires_data_train():
    from clipkit.cli import compose
    from clipkit.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.train='': empty shard spec"):
        validate(compose(["data=shards"])[0])


def test_warmup_longer_than_the_run_is_clamped_with_a_warning():
    """A smoke run (train.steps=20) with the default warmup is not refused: warmup covers the whole run."""
    from clipkit.cli import compose
    from clipkit.config import adjust, validate

    cfg, _ = compose(["train.steps=20"])
    notes = adjust(cfg)
    assert cfg.optim.warmup_steps == 20 and len(notes) == 1 and "optim.warmup_steps=400" in notes[0]
    validate(cfg)
    cfg, _ = compose(["train.steps=1000"])
    assert adjust(cfg) == [] and cfg.optim.warmup_steps == 400


def test_repeated_path_overrides_join_only_when_the_shell_expanded_them():
    """bash turns data.train=/d/{0..2}.tar into three adjacent words: joined back into one spec. A key given again
    later (a base list of overrides, then a change) keeps Hydra's rule: the last one wins."""
    from clipkit.cli import compose, path_overrides

    adjacent = path_overrides(["data.train=/d/0.tar", "data.train=/d/1.tar", "data.train=/d/2.tar", "x.y=1"])
    assert adjacent == ["data.train='{/d/0.tar,/d/1.tar,/d/2.tar}'", "x.y=1"]
    later = path_overrides(["eval.zeroshot.dataset=", "train.steps=3", "eval.zeroshot.dataset=demo"])
    assert compose(later)[0].eval.zeroshot.dataset == "demo"


def test_config_check_imports_neither_torch_nor_open_clip():
    """Components own their configs, and those modules stay light: a config mistake is reported in well under a
    second, before torch (about 2 s to import) or open_clip (about 5 s) would load."""
    import subprocess
    import sys

    code = (
        "import sys; from clipkit.cli import compose; from clipkit.config import validate; "
        "validate(compose(['train.steps=3'])[0]); print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_resume_may_change_only_the_fields_marked_resumable():
    from omegaconf import OmegaConf

    from clipkit.config import RootConfig, resumable_keys
    from clipkit.train import _config_differences

    def differences(**changes) -> list[str]:
        saved, current = (OmegaConf.to_container(OmegaConf.structured(RootConfig())) for _ in range(2))
        for dotted, value in changes.items():
            *path, leaf = dotted.split("__")
            node = current
            for part in path:
                node = node[part]
            node[leaf] = value
        return _config_differences(saved, current, resumable_keys())

    # How a run is read, watched and stopped: marked fields, and whole marked sections.
    assert differences(data__num_workers=7, train__steps=5, parallel__timeout_s=9, name="x") == []
    assert differences(train__compile="step") == []  # (the same numbers within float tolerance)
    assert differences(eval__batch_size=3, logging__wandb=True, data__max_member_mb=1) == []
    # What it trains on, and how: refused, named.
    assert differences(data__shuffle_window=7) == ["data.shuffle_window: 1000 -> 7"]
    assert differences(optim__lr=1.0, train__seed=3) == ["optim.lr: 0.001 -> 1.0", "train.seed: 0 -> 3"]


def test_a_checkpoint_written_before_a_field_existed_resumes(tmp_path):
    """A field clipkit gained later (``train.stages``) reads as its default in an older checkpoint's config: no
    difference, so the run resumes; a value the run did set is still compared."""
    from omegaconf import OmegaConf

    from clipkit.config import RootConfig, resumable_keys
    from clipkit.train import _config_differences, saved_tree

    # (a run's config is resolved: the CLI composes it into typed objects, and config.yaml is written from those)
    current = OmegaConf.to_container(OmegaConf.structured(RootConfig()), resolve=True)
    older = OmegaConf.to_container(OmegaConf.structured(RootConfig()), resolve=True)
    del older["train"]["stages"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    assert _config_differences(saved_tree(tmp_path), current, resumable_keys()) == []
    assert _config_differences(older, current, resumable_keys()) == ["train.stages: None -> []"]  # (as read raw)
    older["train"]["stages"] = ["3:16", "rest:32"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    assert _config_differences(saved_tree(tmp_path), current, resumable_keys()) == [
        "train.stages: ['3:16', 'rest:32'] -> []"
    ]


def test_a_checkpoint_config_this_clipkit_cannot_read_is_a_named_resume_error(tmp_path):
    """A checkpoint whose config has a field this clipkit does not know (written by another version) is refused
    with one line naming the checkpoint, before anything is loaded."""
    import types

    import pytest
    from omegaconf import OmegaConf

    from clipkit import checkpoint as ckpt
    from clipkit.config import RootConfig
    from clipkit.train import ResumeError, resume

    tree = OmegaConf.to_container(OmegaConf.structured(RootConfig()))
    tree["train"]["from_the_future"] = 1

    def write(tmp):
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(tree))

    ckpt.save(tmp_path / "checkpoints", 5, write)
    env = types.SimpleNamespace(is_main=True, world_size=1, rank=0)
    with pytest.raises(ResumeError, match=r"step_00000005 has a config this clipkit cannot read \(ConfigKeyError"):
        resume(tmp_path, RootConfig(), env, engine=None, loader=None, state=None)
