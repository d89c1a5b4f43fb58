"""The root config: composes the components' typed configs, registers the schema in Hydra's ConfigStore, and
runs the checks that span components.

Each component owns its dataclass, with its allowed values as ``Choice`` enums beside the fields and its own
``validate()``: ``ModelConfig`` (model.py), ``DataConfig`` (data/config.py), ``LossConfig`` (loss/),
``OptimConfig`` (optim.py), ``EvalConfig`` (eval/config.py), ``LoggingConfig`` (metrics.py), ``ParallelConfig``
(engine/). Those modules import no torch at import time, so a config check stays fast. The verbs' own settings
(``TrainConfig`` for the loop, ``BenchConfig``, ``format``/``out``) live here: train.py and bench.py are programs
that import everything, and importing them here would make every config check import torch and open_clip. No component
imports this module. The dataclass defaults are complete (they describe the embedded demo run), so the schema
alone is a valid config; ``conf/`` is the preset library. ``validate`` runs before any data, model or process is
built, and raises ``ConfigError`` naming the dotted field and its value.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from clipkit.data.config import DataConfig, layout_problem
from clipkit.distill_config import DistillConfig, DistillKind
from clipkit.engine.config import EngineName, ParallelConfig
from clipkit.errors import PATH, RESUMABLE, WORD, Choice, ConfigError, at_most, non_negative, positive, require
from clipkit.eval.config import EvalConfig
from clipkit.logging_config import LoggingConfig
from clipkit.loss_config import LossConfig, LossName
from clipkit.model_config import ModelConfig, config_json, is_coca
from clipkit.optim_config import OptimConfig
from clipkit.stage_config import parse_stages

__all__ = ["ConfigError", "RootConfig", "TrainConfig", "adjust", "path_keys", "register_configs", "validate"]


MAX_GLOBAL_BATCH = 1 << 24  # 16.8M samples per step: 256x the largest batches in the CLIP literature


class Precision(Choice):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with a loss scaler (DDP only)


class Compile(Choice):
    false = "false"  # eager
    model = "model"  # the model's forward (and its backward) compiled; FSDP: each transformer block
    step = "step"  # forward, loss, backward, clipping and the AdamW update of one step (one process or DDP)
    true = "model"  # (an alias: train.compile=true before the step strategy existed)


class NonFinite(Choice):
    fail = "fail"
    skip = "skip"


class Resume(Choice):
    auto = "auto"  # continue from the run dir's newest complete checkpoint, if any
    never = "never"  # start fresh; refused where checkpoints exist
    restart = "restart"  # move an earlier run's files aside (RUN_DIR.old-TIMESTAMP), then start fresh


class BenchData(Choice):
    synthetic = "synthetic"  # random images and tokens
    train = "train"  # batches of the configured training data, decoded by clipkit's loader


@dataclass
class BenchConfig:
    """``clipkit bench``: timed steps after ``warmup`` ones, on ``synthetic`` or ``train`` data, with open_clip's
    training step as the baseline (``baseline=false`` skips it)."""

    # Timed steps.
    steps: int = 20
    # Untimed steps first (allocation, compilation, caches).
    warmup: int = 5
    # What the timed steps consume: random tensors, or batches decoded from data.train.
    data: BenchData = BenchData.synthetic
    # Also time open_clip's own training step on the same model and batch.
    baseline: bool = True
    # JSON results (default: bench.json in the run dir).
    output: Optional[str] = field(default=None, metadata=PATH)

    def validate(self, prefix: str = "bench") -> None:
        positive(prefix, self, "steps", "warmup")


class EmbedDtype(Choice):
    float16 = "float16"  # clip-retrieval's and autofaiss's default
    float32 = "float32"


@dataclass
class EmbedConfig:
    """``clipkit embed``: normalised image and/or text embeddings of ``data.train``'s shards, in the layout
    clip-retrieval and autofaiss read (``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy``,
    ``metadata/metadata_N.parquet``); part N holds the samples of a fixed group of shards, so a killed run
    resumes at the first part it had not finished and the ranks of a job share the parts."""

    # Embed the images.
    images: bool = True
    # Embed the captions.
    texts: bool = True
    # Samples per forward pass.
    batch_size: int = 256
    # Input shards per output part: the unit of resume and of the split over ranks and loader workers.
    shards_per_part: int = 1
    # On-disk dtype of the embeddings.
    dtype: EmbedDtype = EmbedDtype.float16
    # After every part: a faiss inner-product index per modality (image.index, text.index; needs faiss-cpu).
    index: bool = False
    # DataComp-style CLIP-score filter: filtered/keys_N.txt lists the keys whose image-text cosine similarity is
    # at least this (needs images and texts); null: no filter. Every part's metadata has the score either way.
    filter_threshold: Optional[float] = None

    def validate(self, prefix: str = "embed") -> None:
        positive(prefix, self, "batch_size", "shards_per_part")
        require(f"{prefix}.images", self.images, self.images or self.texts, "embed images, texts or both")
        if self.filter_threshold is not None:
            require(f"{prefix}.filter_threshold", self.filter_threshold, -1.0 <= self.filter_threshold <= 1.0,
                    "a cosine similarity, in [-1, 1]")  # fmt: skip
            require(f"{prefix}.filter_threshold", self.filter_threshold, self.images and self.texts,
                    "needs embed.images=true and embed.texts=true")  # fmt: skip


class Weights(Choice):
    raw = "raw"  # the trained parameters
    ema = "ema"  # their moving average (a run trained with train.ema_decay > 0)


class ExportFormat(Choice):
    open_clip = "open_clip"  # local-dir folder
    hf = "hf"  # transformers CLIPModel
    onnx = "onnx"
    towers = "towers"


@dataclass
class TrainConfig:
    # Optimizer updates in the run.
    steps: int = field(default=800, metadata=RESUMABLE)
    # Samples per update over all ranks (the contrastive batch: every sample is a negative for the others).
    global_batch_size: int = 128
    # Per-rank micro-batch; 0 means global_batch_size / world_size (no accumulation).
    micro_batch_size: int = 0
    # Seeds initialisation, data order and augmentation.
    seed: int = 0
    # Training precision: auto = bf16 autocast on GPU, fp32 on CPU.
    precision: Precision = Precision.auto
    # ``auto`` = cuda if available else cpu.
    device: str = "auto"
    # Write a metrics.jsonl record (and the progress bar, wandb) every N steps.
    log_every: int = field(default=10, metadata=RESUMABLE)
    # Save a verified checkpoint every N steps (and at the end).
    checkpoint_every: int = field(default=400, metadata=RESUMABLE)
    # Checkpoints kept in the run dir (older ones are pruned).
    keep_last: int = field(default=2, metadata=RESUMABLE)
    # A NaN/inf loss or gradient: ``fail`` stops before the update (naming step and rank); ``skip`` drops the
    # step on every rank (parameters and optimizer untouched) and stops after ``max_nonfinite_skips`` in a row.
    nonfinite: NonFinite = NonFinite.fail
    # (skip: the most non-finite steps in a row before the run stops)
    max_nonfinite_skips: int = 3
    # Debug/verification: every rank appends the (epoch, key) of each trained sample to keys/rank_NNN.jsonl.
    record_keys: bool = False
    # torch.compile: ``model`` compiles the forward (falls back to eager, with a warning, if that fails); ``step``
    # the whole step, the update too (the learning rate held as a tensor); ``false`` eager. Results are the same
    # within float tolerance, so a run may resume under another setting.
    compile: Compile = field(default=Compile.false, metadata={**RESUMABLE, **WORD})
    # Channels-last memory format for images and the patch-embedding conv (can help convolutional stems on GPU).
    channels_last: bool = False
    # On CUDA, fp32 matmuls and convolutions (an fp32 run, the loss's B x N products, the root layers kept in
    # fp32) use TF32 tensor cores: fp32 range, 10-bit mantissa inputs, fp32 accumulation. false: full fp32.
    tf32: bool = field(default=True, metadata=RESUMABLE)
    # Checkpoints written in the background (parallel=fsdp): the step loop waits only for the copy of the state.
    async_checkpoint: bool = field(default=False, metadata=RESUMABLE)
    # ``auto`` resumes from the newest complete checkpoint in the run dir; ``never`` starts fresh (refused where
    # checkpoints exist); ``restart`` moves an earlier run's files aside to RUN_DIR.old-TIMESTAMP and starts fresh.
    resume: Resume = field(default=Resume.auto, metadata=RESUMABLE)
    # EMA weights: an fp32 exponential moving average of the trainable parameters with this decay, kept on every
    # engine (sharded like the parameters), checkpointed, evaluated beside them (eval.use_ema); 0 = off.
    ema_decay: float = 0.0
    # Ramp the EMA decay up as min(ema_decay, 1 - (1 + n)^(-2/3)) over the first updates n.
    ema_warmup: bool = True
    # Phases of their own image size and patch dropout (CLIPA, FLIP), e.g. [900:112:0.5,rest:224]: 900 steps at
    # 112 px with half the patches dropped, then the rest at 224 px. Entries STEPS:SIZE[:PATCH_DROPOUT]; the last's
    # STEPS may be ``rest``. The position embedding is interpolated at each switch; [] = one phase at the model's.
    stages: list[str] = field(default_factory=list)

    def micro_batch(self, world_size: int) -> int:
        """Per-rank micro-batch: ``micro_batch_size``, or the global batch split over the ranks."""
        return self.micro_batch_size or self.global_batch_size // world_size

    def validate(self, prefix: str = "train") -> None:
        positive(prefix, self, "steps", "global_batch_size", "log_every", "checkpoint_every", "keep_last")
        non_negative(prefix, self, "micro_batch_size", "max_nonfinite_skips", "seed")
        at_most(prefix, self, "global_batch_size", MAX_GLOBAL_BATCH, "the largest contrastive batches trained are 64k")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"{prefix}.device", self.device, "one of auto, cpu, cuda, cuda:N, mps")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ema_decay", self.ema_decay, "must be in [0, 1) (0 = no EMA weights)")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass
class CaptionConfig:
    # Images to caption: an image file, a folder (its images, by name) or a glob; None = the demo's held-out
    # retrieval images, printed beside their reference captions.
    images: Optional[str] = field(default=None, metadata=PATH)
    # How many images (the first N; 0 = all).
    num: int = 5
    # Longest caption in tokens, start and end included (None: the model's context length).
    max_tokens: Optional[int] = None

    def validate(self, prefix: str = "caption") -> None:
        require(f"{prefix}.num", self.num, self.num >= 0, "must be >= 0 (0 = all)")
        if self.max_tokens is not None:
            require(f"{prefix}.max_tokens", self.max_tokens, self.max_tokens >= 2, "must be >= 2")
        if self.images is not None and not image_files(self.images):
            raise ConfigError(f"{prefix}.images", self.images, f"no image ({', '.join(IMAGE_SUFFIXES)}) found there")


def image_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    found = sorted(path.iterdir()) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(path)))
    return [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


@dataclass
class RootConfig:
    # Run name: the default run dir is runs/NAME.
    name: str = field(default="demo", metadata=RESUMABLE)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=RESUMABLE)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=RESUMABLE)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig, metadata=RESUMABLE)
    embed: EmbedConfig = field(default_factory=EmbedConfig, metadata=RESUMABLE)
    # For ``clipkit eval`` / ``export`` / ``caption``: a run dir, a checkpoint dir or an exported folder.
    checkpoint: Optional[str] = field(default=None, metadata={**PATH, **RESUMABLE})
    # For ``clipkit export``: the kind of artifact to write.
    format: ExportFormat = field(default=ExportFormat.open_clip, metadata=RESUMABLE)
    # (the folder the export, or ``clipkit embed``'s output, is written to; a non-empty export folder is refused
    # unless ``overwrite``; embed resumes in the folder of its own earlier run)
    out: Optional[str] = field(default=None, metadata={**PATH, **RESUMABLE})
    # For ``clipkit export``: replace a non-empty ``out`` whole (the old folder is removed once the new export has
    # been written and verified; never a run or checkpoint dir).
    overwrite: bool = field(default=False, metadata=RESUMABLE)
    # For ``clipkit export`` and ``clipkit caption``: which weights of the checkpoint: raw, or ema (its
    # train.ema_decay average).
    weights: Weights = field(default=Weights.raw, metadata=RESUMABLE)
    # For ``clipkit caption``: which images, how many, how long.
    caption: CaptionConfig = field(default_factory=CaptionConfig, metadata=RESUMABLE)


def marked_keys(mark: str, schema: type = RootConfig, prefix: str = "") -> set[str]:
    """The dotted keys of the fields whose metadata holds ``mark`` (a marked section is one key)."""
    keys = set()
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if f.metadata.get(mark):
            keys.add(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(default):
            keys |= marked_keys(mark, type(default), f"{prefix}{f.name}.")
    return keys


def path_keys() -> set[str]:
    """Overrides whose values are paths, URLs or shard specs (fields marked ``metadata=PATH``): the CLI passes them
    to Hydra as quoted strings (braces, globs, ``::`` and ``@W`` as the shell hands them over) and joins repeated
    ones (a shell-expanded brace pattern)."""
    return {"hydra.run.dir"} | marked_keys("path")


def resumable_keys() -> set[str]:
    """Fields (or whole sections) marked ``metadata=RESUMABLE``: they may differ between a checkpoint's config and
    the run that resumes it; any other difference is refused."""
    return marked_keys("resumable")


def register_configs() -> None:
    ConfigStore.instance().store(name="clipkit_schema", node=RootConfig)


def env_world_size() -> int:
    """World size as the launcher announces it (torchrun, SLURM), before any process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def adjust(cfg: RootConfig) -> list[str]:
    """Settings that are fixed up rather than refused (a smoke run with the default warmup); returns the
    warnings to print. Runs before ``validate``; the adjusted value is what the run records and resumes with."""
    notes = []
    if 0 < cfg.train.steps < cfg.optim.warmup_steps:
        notes.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds train.steps={cfg.train.steps}; "
            f"warming up over all {cfg.train.steps} steps"
        )
        cfg.optim.warmup_steps = cfg.train.steps
    notes += resolve_eval_sets(cfg)
    return notes


def resolve_eval_sets(cfg: RootConfig) -> list[str]:
    """``eval.*.dataset=auto``: the demo's held-out splits when training on the demo; with the user's own data,
    retrieval on the shards ``data.holdout_fraction`` keeps out, else nothing (said, never the demo's images)."""
    demo, holdout = cfg.data.train == "demo", cfg.data.holdout_fraction > 0
    zs, rt = cfg.eval.zeroshot, cfg.eval.retrieval
    was_auto = "auto" in (zs.dataset, rt.dataset)
    if zs.dataset == "auto":
        zs.dataset = "demo" if demo else ""
    if rt.dataset == "auto":
        rt.dataset = "demo" if demo else ("holdout" if holdout else "")
    if zs.dataset == "holdout":
        raise ConfigError("eval.zeroshot.dataset", "holdout", "held-out shards have captions, not class labels")
    if rt.dataset == "holdout" and (demo or not holdout):
        raise ConfigError("eval.retrieval.dataset", "holdout", "needs data.holdout_fraction > 0 and data.train=...")
    if was_auto and not demo and not zs.dataset and not rt.dataset and not cfg.eval.suite:
        return [
            "no eval set: training on your own data evaluates nothing by default; set data.holdout_fraction=0.01 "
            "(retrieval on held-out shards), eval.retrieval.dataset=..., eval.zeroshot.dataset=... or eval.suite=..."
        ]
    return []


def validate(cfg: RootConfig, verb: str = "train", world_size: Optional[int] = None) -> None:
    """Every component's own checks, then the cross-component ones; raises ``ConfigError`` on the first problem.
    Cheap: builds nothing."""
    world_size = env_world_size() if world_size is None else world_size
    cfg.train.validate()
    cfg.optim.validate()
    cfg.loss.validate()
    cfg.distill.validate()
    cfg.model.validate()
    cfg.logging.validate()
    cfg.parallel.validate()
    cfg.bench.validate()
    cfg.embed.validate()
    cfg.caption.validate()
    reads_train = verb in ("train", "embed") or (verb == "bench" and cfg.bench.data == "train")
    cfg.data.validate(check_shards=reads_train)
    cfg.eval.validate(check_sources=verb in ("train", "eval"), allow_pipe=cfg.data.allow_pipe)

    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch(world_size)
    if mbs == 0 or gbs % (world_size * mbs):
        raise ConfigError(
            "train.global_batch_size", gbs, f"must be divisible by world_size x micro_batch_size = {world_size} x {mbs}"
        )
    if verb == "train" or (verb == "bench" and reads_train):
        streams = cfg.data.stream_count(gbs)
        workers = cfg.data.workers(streams // world_size if streams % world_size == 0 else 0)
        problem = layout_problem(streams, gbs, world_size, workers)
        if problem:
            key = problem[0]
            raise ConfigError(key, cfg.data.num_workers if key == "data.num_workers" else cfg.data.streams, problem[1])
    if cfg.loss.name == LossName.siglip and cfg.model.init_logit_bias is None:
        raise ConfigError(
            "model.init_logit_bias",
            None,
            "loss.name=siglip needs a learnable bias: use loss=siglip "
            "(sets model.init_logit_scale=2.3026 and model.init_logit_bias=-10)",
        )
    if not is_coca(cfg.model):
        if cfg.loss.caption_weight is not None:
            raise ConfigError("loss.caption_weight", cfg.loss.caption_weight, "needs a CoCa model (coca_*)")
        require(
            "loss.contrastive_weight",
            0,
            cfg.loss.contrastive_weight > 0,
            "must be > 0: it is the only loss" if not cfg.loss.itm_weight else "must be > 0: ITM's negatives need it",
        )
    if cfg.loss.itm_weight > 0:
        _validate_itm(cfg, verb)
    if cfg.distill.teacher is not None and verb == "train":
        if cfg.loss.name == LossName.siglip and cfg.distill.kind == DistillKind.logits:
            raise ConfigError(
                "distill.kind", cfg.distill.kind, "softmax logit distillation goes with loss=infonce (use features)"
            )
        if cfg.distill.kind == DistillKind.features:
            _require_same_width(cfg)
    if cfg.train.stages:
        parse_stages(cfg.train.stages, cfg.train.steps, cfg.model)
    if cfg.model.lora.on:
        if verb == "bench":  # (it would time the full step on both sides: not what the override asks for)
            raise ConfigError(
                "model.lora.rank",
                cfg.model.lora.rank,
                "clipkit bench times full training steps against open_clip's trainer, which has no LoRA; LoRA's "
                "step is measured by benchmarks/locked_towers.py (its lora configs)",
            )
        _validate_lora(cfg)
    caches = cfg.data.cache_image_features or cfg.data.cache_text_features or cfg.data.cache_teacher_features
    if caches and verb == "train":
        _validate_feature_cache(cfg)
    _validate_engine_support(cfg, world_size)
    if verb in ("eval", "export", "caption", "embed") and cfg.checkpoint is not None:
        require("checkpoint", cfg.checkpoint, Path(cfg.checkpoint).expanduser().exists(), "path not found")
    if verb == "export":
        require("checkpoint", None, cfg.checkpoint is not None, "required: a run dir or a checkpoint dir to export")
        require("out", cfg.out, bool(cfg.out), "required: the folder to write the export to")
        _require_export_destination(cfg.out, cfg.overwrite)
    if verb == "embed":
        require("checkpoint", None, cfg.checkpoint is not None, "required: a run dir or checkpoint dir to embed with")
        require("out", cfg.out, bool(cfg.out), "required: the folder to write the embeddings to")
    if verb == "caption":
        _require_coca_checkpoint(cfg.checkpoint)
    if verb == "train" and cfg.eval.use_ema == "ema" and cfg.train.ema_decay == 0:
        raise ConfigError("eval.use_ema", cfg.eval.use_ema, "needs EMA weights: train.ema_decay > 0 (e.g. 0.999)")
    by_weights = verb in ("export", "caption", "embed")
    asks_ema = (by_weights and cfg.weights == "ema") or (verb == "eval" and cfg.eval.use_ema == "ema")
    if asks_ema and cfg.checkpoint is not None:
        key, value = ("weights", cfg.weights) if by_weights else ("eval.use_ema", cfg.eval.use_ema)
        _require_ema_weights(key, value, cfg.checkpoint)


def _validate_itm(cfg: RootConfig, verb: str) -> None:
    """``loss.itm_weight``: what the matching term needs beside its own fields."""
    if verb == "bench":
        raise ConfigError(
            "loss.itm_weight",
            cfg.loss.itm_weight,
            "clipkit bench times full training steps against open_clip's trainer, which has no ITM term",
        )
    require(
        "train.global_batch_size",
        cfg.train.global_batch_size,
        cfg.train.global_batch_size >= 2,
        "must be >= 2 with loss.itm_weight: the hard negatives come from the rest of the batch",
    )


def _validate_lora(cfg: RootConfig) -> None:
    """``model.lora``: what the adapters run with (the model config checks its own fields)."""
    if cfg.parallel.is_deepspeed:
        raise ConfigError(
            "parallel.engine",
            cfg.parallel.engine,
            "LoRA (model.lora.rank > 0) trains with parallel=ddp or parallel=fsdp: DeepSpeed's checkpoints hold "
            "every weight, the frozen base ones too",
        )
    if is_coca(cfg.model):
        raise ConfigError("model.lora.rank", cfg.model.lora.rank, "LoRA is for CLIP models, not CoCa's caption decoder")
    if cfg.train.stages:
        raise ConfigError(
            "train.stages", cfg.train.stages, "the stages resize the frozen position embedding; not with model.lora"
        )


def _validate_feature_cache(cfg: RootConfig) -> None:
    """``data.cache_*_features``: the cached embeddings must be what the tower would compute at every step, and
    nothing else may need what they replace (the pixels, the caption's tokens)."""
    m, data = cfg.model, cfg.data
    for tower, key, unlocked in (
        ("image", "data.cache_image_features", m.lock_image_unlocked_groups),
        ("text", "data.cache_text_features", m.lock_text_unlocked_layers),
    ):
        if not getattr(data, f"cache_{tower}_features"):
            continue
        if not getattr(m, f"lock_{tower}") or unlocked:
            raise ConfigError(key, True, f"needs a fully locked {tower} tower: model.lock_{tower}=true (none unlocked)")
        if m.lock_train_mode:
            raise ConfigError(key, True, "needs the locked tower in eval mode (model.lock_train_mode=false)")
        if is_coca(m):
            raise ConfigError(key, True, "a CoCa model's caption decoder reads the towers' tokens, not embeddings")
        if cfg.distill.teacher is not None and not data.cache_teacher_features:
            reason = "the distillation teacher reads the images and captions: add data.cache_teacher_features=true"
            raise ConfigError(key, True, reason)
    if data.cache_teacher_features and cfg.distill.teacher is None:
        raise ConfigError("data.cache_teacher_features", True, "needs a teacher (distill.teacher)")
    if data.cache_image_features or data.cache_teacher_features:
        key = "data.cache_image_features" if data.cache_image_features else "data.cache_teacher_features"
        if data.crop_scale_min < 1:
            raise ConfigError(
                "data.crop_scale_min",
                data.crop_scale_min,
                f"{key}=true needs augmentation off (data.crop_scale_min=1): a random crop gives the tower other "
                "pixels every epoch than the ones cached",
            )
        if cfg.train.stages:
            raise ConfigError(key, True, "train.stages change the image size between stages")


def _require_export_destination(out: str, overwrite: bool) -> None:
    """``out`` is a new or empty folder, or (``overwrite``) a folder to replace whole; never a file, a run dir or
    a checkpoint dir (an export there would overwrite a checkpoint's weights)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("out", out, "is a file; give a folder for the export")
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        raise ConfigError("out", out, "is a run dir; export to another folder (e.g. a new folder inside it)")
    for parent in (path, *path.parents):
        if (parent / "manifest.json").is_file():
            raise ConfigError("out", out, f"is inside the checkpoint {parent}; export to another folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError("out", out, "is not empty; choose a new folder, or overwrite=true to replace it whole")


def saved_config(path: Path) -> RootConfig:
    """The typed config a run or checkpoint dir carries (its ``config.yaml`` over the schema's defaults)."""
    text = OmegaConf.load(Path(path) / "config.yaml")
    if isinstance(OmegaConf.select(text, "train.compile"), bool):  # (written before train.compile=step existed)
        text.train.compile = "model" if text.train.compile else "false"
    saved = OmegaConf.merge(OmegaConf.structured(RootConfig), text)
    return OmegaConf.to_object(saved)


def _require_same_width(cfg: RootConfig) -> None:
    """``distill.kind=features`` compares embeddings: the teacher's width must be the student's (read from the
    configs; nothing is built)."""
    student = config_json(cfg.model)["embed_dim"]
    path = Path(cfg.distill.teacher).expanduser()
    if (path / "open_clip_config.json").is_file():
        teacher = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    else:
        from clipkit import checkpoint as ckpt

        named = saved_config(ckpt.resolve(path)).model if path.exists() else ModelConfig(cfg.distill.teacher)
        found = config_json(named)
        if found is None:
            raise ConfigError("distill.teacher", cfg.distill.teacher, "unknown open_clip model")
        teacher = found["embed_dim"]
    if teacher != student:
        raise ConfigError(
            "distill.kind",
            cfg.distill.kind,
            f"features needs the teacher's embedding width ({teacher}) to be the student's ({student}); use logits",
        )


def _require_coca_checkpoint(checkpoint: Optional[str]) -> None:
    """``clipkit caption`` reads a clipkit run or checkpoint dir of a CoCa model."""
    from clipkit import checkpoint as ckpt

    require("checkpoint", None, checkpoint is not None, "required: a CoCa run dir or checkpoint dir to caption with")
    path = Path(checkpoint).expanduser()
    try:
        saved = saved_config(ckpt.resolve(path))
    except (FileNotFoundError, ValueError, ckpt.CorruptCheckpoint) as err:
        raise ConfigError("checkpoint", checkpoint, f"not a clipkit run or checkpoint dir ({err})") from None
    if not is_coca(saved.model):
        raise ConfigError("checkpoint", checkpoint, f"its model {saved.model.name} is not a CoCa model: no captioner")


def _require_ema_weights(key: str, value, checkpoint: str) -> None:
    from clipkit import checkpoint as ckpt
    from clipkit import ema as ema_lib

    try:
        path = ckpt.resolve(Path(checkpoint).expanduser())
    except (FileNotFoundError, ckpt.CorruptCheckpoint):
        return  # (the verb says what is wrong with the checkpoint itself)
    if ema_lib.ema_weights(path) is None:
        raise ConfigError(
            key, value, f"{path} has no EMA weights: its run trained with train.ema_decay=0 (use {key}=raw)"
        )


def _validate_engine_support(cfg: RootConfig, world_size: int) -> None:
    """What the sharded engines (DeepSpeed ZeRO, FSDP) do not support of the training config."""
    engine = cfg.parallel.engine
    if cfg.train.async_checkpoint and engine != EngineName.fsdp:
        raise ConfigError("train.async_checkpoint", True, f"needs parallel=fsdp (torch DCP), not {engine}")
    if cfg.train.stages and engine not in (EngineName.ddp, EngineName.fsdp):
        raise ConfigError("train.stages", list(cfg.train.stages), f"supported with parallel=ddp or fsdp, not {engine}")
    if cfg.train.compile == Compile.step and engine == EngineName.ddp:
        # One compiled call per step: gradient caching's passes replay RNG states between forwards, and the fp16
        # scaler's step decides on the host.
        require("train.compile", "step", cfg.train.precision != Precision.fp16, "runs bf16 or fp32, not fp16")
        micro = cfg.train.micro_batch(world_size)
        require("train.compile", "step", micro * world_size >= cfg.train.global_batch_size,
                f"needs one micro-batch per step (train.micro_batch_size={micro} splits it); use model")  # fmt: skip
    if engine == EngineName.ddp:
        return
    if cfg.train.precision == Precision.fp16:
        raise ConfigError("train.precision", "fp16", f"parallel={engine} runs bf16 or fp32 (no fp16 loss scaler)")
    if cfg.train.compile == Compile.step:
        raise ConfigError("train.compile", "step", f"supported with parallel=ddp only, not {engine} (use model)")
    if cfg.train.compile == Compile.model and engine != EngineName.fsdp:
        raise ConfigError("train.compile", "model", f"supported with parallel=ddp or fsdp, not {engine}")
    if cfg.train.channels_last:
        raise ConfigError("train.channels_last", True, f"supported with parallel=ddp only, not {engine}")
    if engine == EngineName.zero3 and cfg.train.micro_batch(world_size) * world_size < cfg.train.global_batch_size:
        # Measured: DeepSpeed 0.19.8's stage 3 gives wrong gradients from the second step on when one step
        # runs several backward passes (gradient caching); stages 1 and 2 match one process.
        raise ConfigError(
            "train.micro_batch_size",
            cfg.train.micro_batch_size,
            "gradient caching (micro-batches) is not supported with parallel=zero3; use zero2 or a larger micro-batch",
        )
