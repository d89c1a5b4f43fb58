"""The one typed config schema, registered in Hydra's ConfigStore, and its up-front validation.

Every component owns a dataclass; ``RootConfig`` composes them. The dataclass defaults are complete (they
describe the embedded demo run), so the schema alone is a valid config; ``conf/`` is the preset library.
``validate`` runs before any data, model or process is built, and raises ``ConfigError`` naming the dotted
field and its value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A user mistake in the config: names the dotted field, the value and what is wrong."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")


# Overrides whose values are paths, URLs or shard specs: the CLI passes them to Hydra as quoted strings (braces,
# globs, ``::`` and ``@W`` as the shell hands them over) and joins repeated ones (a shell-expanded brace pattern).
PATH_KEYS = frozenset(
    {
        "data.train",
        "data.cache_dir",
        "model.config",
        "model.pretrained",
        "model.init_from",
        "eval.zeroshot.dataset",
        "eval.zeroshot.classnames",
        "eval.zeroshot.templates",
        "eval.retrieval.dataset",
        "eval.retrieval.image_root",
        "eval.suite",
        "eval.output",
        "bench.output",
        "checkpoint",
        "out",
        "hydra.run.dir",
    }
)


@dataclass
class ModelConfig:
    # open_clip model name (``ViT-B-32``) or a config shipped with clipkit (``clipkit-tiny``).
    name: str = "clipkit-tiny"
    # Path to an open_clip model JSON (embed_dim, vision_cfg, text_cfg); overrides ``name``.
    config: Optional[str] = None
    # Local weights file for ``name``; clipkit never downloads at run time.
    pretrained: Optional[str] = None
    # Start from these weights (a clipkit run or checkpoint dir, an exported open_clip folder, or a .safetensors
    # state dict), e.g. to continue pretraining. Ignored once the run has its own checkpoint to resume from.
    init_from: Optional[str] = None
    grad_checkpointing: bool = False
    # FLIP-style patch dropout: the fraction of image patches dropped in training (0 = off; eval sees all).
    patch_dropout: float = 0.0
    # Initial temperature log(t) and bias; None = open_clip's defaults (log(1/0.07), no bias). SigLIP: log(10), -10.
    init_logit_scale: Optional[float] = None
    init_logit_bias: Optional[float] = None


@dataclass
class DemoDataConfig:
    seed: int = 0
    image_size: int = 40
    num_train: int = 24000
    num_zeroshot: int = 1800
    num_retrieval: int = 1000
    shard_size: int = 2000
    num_captions: int = 4


@dataclass
class DataConfig:
    # Shard spec (``/data/{00000..00099}.tar``) or ``demo`` for the embedded demo data.
    train: str = "demo"
    # ``epoch``: each sample once per epoch; ``resampled``: shards drawn with replacement, forever.
    mode: str = "epoch"
    num_workers: int = 2
    # Window of the seeded sample shuffle (samples); 0 keeps tar order.
    shuffle_window: int = 1000
    # Image members tried in order, separated by ``;``.
    image_key: str = "jpg;png;webp;jpeg"
    # ``auto``: a ``txt`` member, else the ``json`` member's ``caption`` (img2dataset), else its ``captions``;
    # or a member (``txt``), or ``json:FIELD`` (a list gives one seeded pick per use).
    caption_key: str = "auto"
    # Shards whose size nothing announces (pipe:, no sizes.json / _stats.json) are read to their end; this
    # total only sets the epoch fraction shown in logs (0 = whole epochs).
    num_samples: int = 0
    # Above this fraction of bad samples (undecodable, no caption, lost to a broken tar) the run stops.
    max_bad_fraction: float = 0.1
    # False refuses ``pipe:`` shard URLs (shell commands): set it when running configs you did not write.
    allow_pipe: bool = True
    # A shard of the spec that does not exist: refused up front (False), or, when True, warned about and its
    # announced samples (sizes.json) counted as ``missing`` while the run goes on.
    allow_missing_shards: bool = False
    # No batch for this long (seconds) stops the run, naming the slot, shard and position it was reading; 0 = off.
    stall_timeout_s: float = 300.0
    # Remote shards: transient errors (connection reset, timeout, HTTP 5xx) retried per shard, with exponential
    # backoff from retry_backoff_s; a shard that keeps failing counts its remaining samples as missing.
    remote_retries: int = 5
    retry_backoff_s: float = 1.0
    crop_scale_min: float = 0.9
    crop_scale_max: float = 1.0
    prefetch_factor: int = 4
    # Where the demo data is generated and cached.
    cache_dir: str = "${oc.env:CLIPKIT_CACHE,'~/.cache/clipkit'}"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class LossConfig:
    # ``infonce`` (softmax, CLIP) or ``siglip`` (sigmoid; needs model.init_logit_bias, see conf/loss/siglip.yaml).
    name: str = "infonce"
    # InfoNCE only: ``gathered`` (B x N logits) or ``tiled`` (blockwise, memory O(B x chunk)).
    impl: str = "gathered"
    # Columns per block for tiled InfoNCE and SigLIP: ``auto`` or a positive integer.
    chunk_size: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    # ``cosine`` (to ``min_lr_ratio`` x lr) or ``constant`` after warmup.
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    # Max global gradient norm; 0 disables clipping.
    grad_clip_norm: float = 1.0
    # Weight decay follows open_clip's trainer (token and positional embeddings decayed); true exempts them.
    exclude_embeddings_from_decay: bool = False


@dataclass
class TrainConfig:
    steps: int = 800
    global_batch_size: int = 128
    # Per-rank micro-batch; 0 means global_batch_size / world_size (no accumulation).
    micro_batch_size: int = 0
    seed: int = 0
    # ``auto`` = bf16 autocast on GPU, fp32 on CPU; or ``fp32``, ``bf16``, ``fp16``.
    precision: str = "auto"
    # ``auto`` = cuda if available else cpu.
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 400
    keep_last: int = 2
    # A NaN/inf loss or gradient: ``fail`` stops before the update (naming step and rank); ``skip`` drops the
    # step on every rank (parameters and optimizer untouched) and stops after ``max_nonfinite_skips`` in a row.
    nonfinite: str = "fail"
    max_nonfinite_skips: int = 3
    # Debug/verification: every rank appends the (epoch, key) of each trained sample to keys/rank_NNN.jsonl.
    record_keys: bool = False
    # torch.compile the model for training (falls back to eager, with a warning, if compilation fails).
    compile: bool = False
    # Channels-last memory format for images and the patch-embedding conv (can help convolutional stems on GPU).
    channels_last: bool = False
    # ``auto`` resumes from the newest complete checkpoint in the run dir; ``never`` starts fresh.
    resume: str = "auto"


@dataclass
class ZeroShotConfig:
    # Shards with a ``cls`` member, an image folder (one sub-folder per class), a CSV/parquet table (image
    # path, label), or ``demo``; empty disables.
    dataset: str = "demo"
    # A built-in set (imagenet1k, cifar10, cifar100) or a .txt/.json/.yaml file; an image folder's default is
    # its sub-folder names.
    classnames: Optional[str] = None
    # A built-in set (openai_imagenet, simple_imagenet, cifar) or a file of templates with ``{c}``; default:
    # the class-name set's own, else "a photo of a {c}."
    templates: Optional[str] = None
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class RetrievalConfig:
    # Shards with captions, a CSV/parquet table (image path, caption; repeated paths = several captions),
    # a COCO captions or Karpathy-style JSON, or ``demo``; empty disables.
    dataset: str = "demo"
    image_column: str = "image"
    caption_column: str = "caption"
    # JSON datasets: folder the image file names are relative to (default: the JSON's folder), and the
    # Karpathy split to use.
    image_root: Optional[str] = None
    split: str = "test"


@dataclass
class EvalConfig:
    # Evaluate every N steps during training (0 = only at the end).
    every: int = 0
    batch_size: int = 256
    num_workers: int = 1
    # ``auto`` = bf16 autocast on GPU, fp32 on CPU; or ``fp32`` / ``bf16``.
    precision: str = "auto"
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # A YAML file listing more tasks: [{name, task: zeroshot|retrieval, dataset, ...}], run in one call.
    suite: Optional[str] = None
    # JSON output of ``clipkit eval`` (default: eval.json in the run dir).
    output: Optional[str] = None


@dataclass
class LoggingConfig:
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "clipkit"
    wandb_entity: Optional[str] = None
    # ``offline`` needs no account; ``online`` needs credentials and network.
    wandb_mode: str = "offline"
    # Peak dense TFLOP/s of one device at the precision in use, for MFU; 0 = known GPUs from a table, none on CPU.
    peak_tflops: float = 0.0


@dataclass
class ParallelConfig:
    # ``ddp`` (torch DDP; a single process needs no wrapper) or DeepSpeed ``zero1`` / ``zero2`` / ``zero3``.
    engine: str = "ddp"
    # Collective timeout: a rank that dies or stalls makes the others fail after this long instead of hanging.
    timeout_s: int = 600
    # DeepSpeed only (the JSON is generated from these and from train/optim; there is no second file):
    # keep optimizer state (and, for zero3, parameters) in CPU memory.
    offload_optimizer: bool = False
    offload_params: bool = False
    # Overlap gradient reduction with backward (DeepSpeed supports it with clipkit's accumulation on zero2 only).
    overlap_comm: bool = True
    # Gradient reduce / parameter all-gather bucket size, in millions of elements.
    bucket_size_m: int = 200
    # On SIGUSR1 (SLURM's --signal) after the checkpoint: ``scontrol requeue $SLURM_JOB_ID`` from rank 0.
    requeue: bool = True


@dataclass
class BenchConfig:
    """``clipkit bench``: timed steps after ``warmup`` ones, on ``synthetic`` or ``train`` data, with open_clip's
    training step as the baseline (``baseline=false`` skips it)."""

    steps: int = 20
    warmup: int = 5
    data: str = "synthetic"
    baseline: bool = True
    output: Optional[str] = None


@dataclass
class RootConfig:
    name: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    # For ``clipkit eval`` / ``clipkit export``: a run dir, a checkpoint dir or an exported folder.
    checkpoint: Optional[str] = None
    # For ``clipkit export``: ``open_clip`` (local-dir folder), ``hf`` (transformers CLIPModel), ``onnx``, ``towers``.
    format: str = "open_clip"
    out: Optional[str] = None


@dataclass
class EvalTask:
    name: str
    kind: str  # "zeroshot" | "retrieval"
    cfg: Any  # ZeroShotConfig | RetrievalConfig


def load_eval_suite(path: str | Path) -> list[EvalTask]:
    """An ``eval.suite`` YAML file: a list of {name, task: zeroshot|retrieval, dataset, ...that task's fields}.
    Unknown fields fail with their name (merged into the typed configs)."""
    entries = OmegaConf.load(Path(path).expanduser())
    if not OmegaConf.is_list(entries):
        raise ValueError(f"{path}: expected a list of tasks")
    tasks = []
    for i, entry in enumerate(entries):
        entry = OmegaConf.to_container(entry)
        name, kind = entry.pop("name", None), entry.pop("task", None)
        if kind not in ("zeroshot", "retrieval"):
            raise ValueError(f"{path}: task {i} needs task: zeroshot or retrieval (got {kind!r})")
        schema = ZeroShotConfig if kind == "zeroshot" else RetrievalConfig
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), entry))
        tasks.append(EvalTask(name or f"{kind}_{i}", kind, cfg))
    return tasks


def register_configs() -> None:
    ConfigStore.instance().store(name="clipkit_schema", node=RootConfig)


# ---------------------------------------------------------------------------------------------------- validation

_CHOICES = {
    "data.mode": ("epoch", "resampled"),
    "loss.name": ("infonce", "siglip"),
    "loss.impl": ("gathered", "tiled"),
    "optim.schedule": ("cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.resume": ("auto", "never"),
    "train.nonfinite": ("fail", "skip"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "eval.precision": ("auto", "fp32", "bf16"),
    "bench.data": ("synthetic", "train"),
    "parallel.engine": ("ddp", "zero1", "zero2", "zero3"),
    "format": ("open_clip", "hf", "onnx", "towers"),
}
_POSITIVE = (
    "train.steps",
    "train.global_batch_size",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "eval.batch_size",
    "optim.lr",
    "optim.eps",
    "parallel.timeout_s",
    "parallel.bucket_size_m",
    "bench.steps",
    "bench.warmup",
    "data.prefetch_factor",
    "data.demo.image_size",
    "data.demo.num_train",
    "data.demo.shard_size",
    "data.demo.num_captions",
)
_NON_NEGATIVE = (
    "train.micro_batch_size",
    "train.max_nonfinite_skips",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.grad_clip_norm",
    "optim.min_lr_ratio",
    "data.num_workers",
    "data.shuffle_window",
    "data.num_samples",
    "data.stall_timeout_s",
    "data.remote_retries",
    "data.retry_backoff_s",
    "eval.every",
    "eval.num_workers",
    "data.demo.num_zeroshot",
    "data.demo.num_retrieval",
)


def get(cfg: RootConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def env_world_size() -> int:
    """World size as the launcher announces it (torchrun, SLURM), before any process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def micro_batch_size(cfg: RootConfig, world_size: int) -> int:
    return cfg.train.micro_batch_size or cfg.train.global_batch_size // world_size


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
    return notes


def validate(cfg: RootConfig, verb: str = "train", world_size: Optional[int] = None) -> None:
    """Cross-field checks; raises ``ConfigError`` on the first problem. Cheap: builds nothing."""
    world_size = env_world_size() if world_size is None else world_size
    for key, allowed in _CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(key, get(cfg, key), f"must be one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(key, get(cfg, key), "must be > 0")
    for key in _NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(key, get(cfg, key), "must be >= 0")
    if not 0 <= cfg.model.patch_dropout < 1:
        raise ConfigError("model.patch_dropout", cfg.model.patch_dropout, "must be in [0, 1)")
    if cfg.logging.peak_tflops < 0:
        raise ConfigError("logging.peak_tflops", cfg.logging.peak_tflops, "must be >= 0")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError("data.max_bad_fraction", cfg.data.max_bad_fraction, "must be in [0, 1]")
    if not 0 < cfg.data.crop_scale_min <= cfg.data.crop_scale_max <= 1:
        raise ConfigError(
            "data.crop_scale_min", cfg.data.crop_scale_min, "need 0 < crop_scale_min <= crop_scale_max <= 1"
        )
    if not (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1):
        raise ConfigError(
            "optim.beta1" if not 0 <= cfg.optim.beta1 < 1 else "optim.beta2",
            cfg.optim.beta1 if not 0 <= cfg.optim.beta1 < 1 else cfg.optim.beta2,
            "must be in [0, 1)",
        )
    if cfg.optim.min_lr_ratio > 1:
        raise ConfigError("optim.min_lr_ratio", cfg.optim.min_lr_ratio, "must be <= 1")
    gbs, mbs = cfg.train.global_batch_size, micro_batch_size(cfg, world_size)
    if mbs == 0 or gbs % (world_size * mbs):
        raise ConfigError(
            "train.global_batch_size", gbs, f"must be divisible by world_size x micro_batch_size = {world_size} x {mbs}"
        )
    _validate_loss(cfg)
    _validate_model(cfg)
    _validate_parallel(cfg, world_size)
    if verb == "train" or (verb == "bench" and cfg.bench.data == "train"):
        sources = _validate_shards(
            "data.train",
            cfg.data.train,
            allow_pipe=cfg.data.allow_pipe,
            check_exists=not cfg.data.allow_missing_shards,
        )
        if cfg.data.mode == "epoch" and any(s.weight != 1.0 for s in sources):
            raise ConfigError(
                "data.train",
                cfg.data.train,
                "source weights (@W) need data.mode=resampled; an epoch visits every sample exactly once",
            )
    if verb in ("train", "eval"):
        _validate_eval(cfg)
    if verb in ("eval", "export") and cfg.checkpoint is not None and not Path(cfg.checkpoint).expanduser().exists():
        raise ConfigError("checkpoint", cfg.checkpoint, "path not found")
    if verb == "export":
        if cfg.checkpoint is None:
            raise ConfigError("checkpoint", None, "required: a run dir or a checkpoint dir to export")
        if not cfg.out:
            raise ConfigError("out", cfg.out, "required: the folder to write the export to")


def known_model_names() -> set[str]:
    """open_clip's bundled config names plus clipkit's shipped ones, without importing torch (fast)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(loc) / "model_configs" for loc in (spec.submodule_search_locations or [])] if spec else []
    dirs.append(Path(__file__).parent / "model_configs")
    return {p.stem for d in dirs for p in d.glob("*.json")}


def _validate_model(cfg: RootConfig) -> None:
    m = cfg.model
    if m.config is not None:
        if not Path(m.config).expanduser().is_file():
            raise ConfigError("model.config", m.config, "file not found")
    elif m.name.startswith("hf-hub:"):
        raise ConfigError("model.name", m.name, "hub models need the network; clipkit loads models offline only")
    elif m.name not in known_model_names():
        raise ConfigError(
            "model.name",
            m.name,
            "unknown open_clip model (see `python -c 'import open_clip; "
            "print(open_clip.list_models())'`, or pass model.config=FILE.json)",
        )
    if m.init_from is not None:
        path = Path(m.init_from).expanduser()
        if not path.exists():
            raise ConfigError("model.init_from", m.init_from, "path not found")
        if path.is_file() and path.suffix != ".safetensors":
            raise ConfigError(
                "model.init_from",
                m.init_from,
                "expects safetensors, a run/checkpoint dir or an "
                "open_clip export; for open_clip .pt/.bin weights use model.pretrained",
            )
    if m.pretrained is not None and not Path(m.pretrained).expanduser().is_file():
        raise ConfigError(
            "model.pretrained",
            m.pretrained,
            "not a local file: clipkit loads weights offline only; download the weights and pass their path",
        )


def _validate_eval_task(prefix: str, kind: str, task, allow_pipe: bool) -> None:
    from clipkit.data.shards import is_shard_spec
    from clipkit.eval import prompts

    dataset = task.dataset
    if dataset not in ("", "demo"):
        if is_shard_spec(dataset):
            _validate_shards(f"{prefix}.dataset", dataset, allow_empty=True, allow_pipe=allow_pipe)
        elif not Path(dataset).expanduser().exists():
            raise ConfigError(f"{prefix}.dataset", dataset, "not found (shards, a folder, a table or a JSON file)")
    if kind != "zeroshot":
        return
    for key in ("classnames", "templates"):
        value = getattr(task, key)
        builtin = prompts.BUILTIN_CLASSNAMES if key == "classnames" else prompts.BUILTIN_TEMPLATES
        if value is not None and value not in builtin and not Path(value).expanduser().is_file():
            raise ConfigError(f"{prefix}.{key}", value, f"neither a file nor a built-in set ({', '.join(builtin)})")
    try:
        prompts.templates(task.templates, task.classnames)
    except ValueError as err:
        raise ConfigError(f"{prefix}.templates", task.templates, str(err)) from None
    is_folder = Path(dataset).expanduser().is_dir() and not list(Path(dataset).expanduser().glob("*.tar"))
    if dataset not in ("", "demo") and not is_folder and task.classnames is None:
        raise ConfigError(f"{prefix}.classnames", None, f"required for dataset {dataset!r}")


def _validate_eval(cfg: RootConfig) -> None:
    _validate_eval_task("eval.zeroshot", "zeroshot", cfg.eval.zeroshot, cfg.data.allow_pipe)
    _validate_eval_task("eval.retrieval", "retrieval", cfg.eval.retrieval, cfg.data.allow_pipe)
    if cfg.eval.suite is None:
        return
    if not Path(cfg.eval.suite).expanduser().is_file():
        raise ConfigError("eval.suite", cfg.eval.suite, "file not found")
    try:
        tasks = load_eval_suite(cfg.eval.suite)
    except Exception as err:  # OmegaConf names the unknown or mistyped field
        raise ConfigError("eval.suite", cfg.eval.suite, str(err).splitlines()[0]) from None
    for task in tasks:
        _validate_eval_task(f"eval.suite[{task.name}]", task.kind, task.cfg, cfg.data.allow_pipe)


def _validate_parallel(cfg: RootConfig, world_size: int) -> None:
    p = cfg.parallel
    if p.engine == "ddp":
        for key in ("offload_optimizer", "offload_params"):
            if getattr(p, key):
                raise ConfigError(f"parallel.{key}", True, "offload needs a DeepSpeed engine (parallel=zero1|2|3)")
    elif cfg.train.precision == "fp16":
        raise ConfigError("train.precision", "fp16", "ZeRO engines run bf16 or fp32 (no fp16 loss scaler)")
    elif cfg.train.compile or cfg.train.channels_last:
        key = "train.compile" if cfg.train.compile else "train.channels_last"
        raise ConfigError(key, True, f"supported with parallel=ddp only, not {p.engine}")
    elif p.engine == "zero3" and micro_batch_size(cfg, world_size) * world_size < cfg.train.global_batch_size:
        # Measured: DeepSpeed 0.19.8's stage 3 gives wrong gradients from the second step on when one step
        # runs several backward passes (gradient caching); stages 1 and 2 match one process.
        raise ConfigError(
            "train.micro_batch_size",
            cfg.train.micro_batch_size,
            "gradient caching (micro-batches) is not supported with parallel=zero3; use zero2 or a larger micro-batch",
        )
    elif p.offload_params and p.engine != "zero3":
        raise ConfigError("parallel.offload_params", True, f"parameter offload needs parallel=zero3, not {p.engine}")


def _validate_loss(cfg: RootConfig) -> None:
    chunk = cfg.loss.chunk_size
    if chunk != "auto" and not (chunk.isdigit() and int(chunk) > 0):
        raise ConfigError("loss.chunk_size", chunk, "must be 'auto' or a positive integer")
    if cfg.loss.name == "siglip":
        if cfg.model.init_logit_bias is None:
            raise ConfigError(
                "model.init_logit_bias",
                None,
                "loss.name=siglip needs a learnable bias: use loss=siglip "
                "(sets model.init_logit_scale=2.3026 and model.init_logit_bias=-10)",
            )
        if cfg.loss.impl != "gathered":
            raise ConfigError("loss.impl", cfg.loss.impl, "applies to InfoNCE only; SigLIP is always blockwise")


def _validate_shards(
    key: str, spec: str, allow_empty: bool = False, allow_pipe: bool = True, check_exists: bool = True
) -> list:
    from clipkit.data.shards import ShardSpecError, expand_spec

    if spec == "demo" or (allow_empty and spec == ""):
        return []
    try:
        return expand_spec(spec, check_exists=check_exists, allow_pipe=allow_pipe)
    except ShardSpecError as err:
        raise ConfigError(key, spec, str(err)) from None
