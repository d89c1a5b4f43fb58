"""The eval component's config: zero-shot classification, retrieval, a suite file of more tasks (``eval.*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from clipkit import yaml_files
from clipkit.data.config import check_shard_spec
from clipkit.errors import PATH, Choice, ConfigError, non_negative, positive, require
from clipkit.eval import prompts


class UseEma(Choice):
    both = "both"
    ema = "ema"
    raw = "raw"


class EvalPrecision(Choice):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class ZeroShotConfig:
    # Shards with a ``cls`` member, an image folder (one sub-folder per class), a CSV/parquet table (image
    # path, label), or ``demo``; empty disables; ``auto``: the demo split when training on the demo, else none.
    dataset: str = field(default="auto", metadata=PATH)
    # A built-in set (imagenet1k, cifar10, cifar100) or a .txt/.json/.yaml file; an image folder's default is
    # its sub-folder names.
    classnames: Optional[str] = field(default=None, metadata=PATH)
    # A built-in set (openai_imagenet, simple_imagenet, cifar) or a file of templates with ``{c}``; default:
    # the class-name set's own, else "a photo of a {c}."
    templates: Optional[str] = field(default=None, metadata=PATH)
    # Table datasets: the column with image paths.
    image_column: str = "image"
    # (the column with class indices or names)
    label_column: str = "label"

    def validate(self, prefix: str, allow_pipe: bool) -> None:
        _check_dataset(prefix, self.dataset, allow_pipe)
        for key in ("classnames", "templates"):
            value = getattr(self, key)
            builtin = prompts.BUILTIN_CLASSNAMES if key == "classnames" else prompts.BUILTIN_TEMPLATES
            if value is not None and value not in builtin and not Path(value).expanduser().is_file():
                raise ConfigError(f"{prefix}.{key}", value, f"neither a file nor a built-in set ({', '.join(builtin)})")
        try:
            prompts.templates(self.templates, self.classnames)
        except ValueError as err:
            raise ConfigError(f"{prefix}.templates", self.templates, str(err)) from None
        if self.classnames is not None and self.classnames not in prompts.BUILTIN_CLASSNAMES:
            try:  # (a duplicated line would shift or blur the labels; a bad YAML file says so here, not later)
                prompts.classnames(self.classnames)
            except ValueError as err:
                raise ConfigError(f"{prefix}.classnames", self.classnames, str(err)) from None
        folder = Path(self.dataset).expanduser()
        is_folder = folder.is_dir() and not list(folder.glob("*.tar"))
        if self.dataset not in ("", "demo", "auto") and not is_folder and self.classnames is None:
            raise ConfigError(f"{prefix}.classnames", None, f"required for dataset {self.dataset!r}")


@dataclass
class RetrievalConfig:
    # Shards with captions, a CSV/parquet table (image path, caption; repeated paths = several captions), a COCO
    # captions or Karpathy-style JSON, ``demo``, or ``holdout`` (the shards data.holdout_fraction keeps out of
    # training); empty disables; ``auto``: ``demo`` with the demo data, ``holdout`` when a fraction is held out.
    dataset: str = field(default="auto", metadata=PATH)
    # Table datasets: the column with image paths.
    image_column: str = "image"
    # (the column with captions)
    caption_column: str = "caption"
    # JSON datasets: folder the image file names are relative to (default: the JSON's folder), and the
    # Karpathy split to use.
    image_root: Optional[str] = field(default=None, metadata=PATH)
    # (the Karpathy split)
    split: str = "test"
    # A model with an ITM head (loss.itm_weight): each query's top K candidates are re-ranked by the head's score,
    # reported beside plain retrieval; 0 = no re-ranking.
    itm_k: int = 16

    def validate(self, prefix: str, allow_pipe: bool) -> None:
        _check_dataset(prefix, self.dataset, allow_pipe)
        require(f"{prefix}.itm_k", self.itm_k, self.itm_k >= 0, "must be >= 0 (0 = no ITM re-ranking)")


def _check_dataset(prefix: str, dataset: str, allow_pipe: bool) -> None:
    if dataset in ("", "demo", "auto", "holdout"):  # ("auto" is resolved by config.adjust, "holdout" checked there)
        return
    from clipkit.data.shards import is_shard_spec  # (imports webdataset, hence torch)

    if is_shard_spec(dataset):
        check_shard_spec(f"{prefix}.dataset", dataset, allow_empty=True, allow_pipe=allow_pipe)
    elif not Path(dataset).expanduser().exists():
        raise ConfigError(f"{prefix}.dataset", dataset, "not found (shards, a folder, a table or a JSON file)")


@dataclass
class EvalConfig:
    # Evaluate every N steps during training (0 = only at the end).
    every: int = 0
    # Images or captions per eval batch.
    batch_size: int = 256
    # Eval loader workers per rank.
    num_workers: int = 1
    # auto = the training precision.
    precision: EvalPrecision = EvalPrecision.auto
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # A YAML file listing more tasks: [{name, task: zeroshot|retrieval, dataset, ...}], run in one call.
    suite: Optional[str] = field(default=None, metadata=PATH)
    # JSON output of ``clipkit eval`` (default: eval.json in the run dir).
    output: Optional[str] = field(default=None, metadata=PATH)
    # With EMA weights (train.ema_decay > 0, or a checkpoint that has them): evaluate both (the EMA results as
    # NAME_ema), only the EMA weights, or only the raw ones. Without EMA weights: raw (ema is then an error).
    use_ema: UseEma = UseEma.both

    def validate(self, check_sources: bool, allow_pipe: bool = True, prefix: str = "eval") -> None:
        """Own fields; with ``check_sources`` (train, eval) every dataset, class-name and template source."""
        positive(prefix, self, "batch_size")
        non_negative(prefix, self, "every", "num_workers")
        if not check_sources:
            return
        self.zeroshot.validate(f"{prefix}.zeroshot", allow_pipe)
        self.retrieval.validate(f"{prefix}.retrieval", allow_pipe)
        if self.suite is None:
            return
        if not Path(self.suite).expanduser().is_file():
            raise ConfigError(f"{prefix}.suite", self.suite, "file not found")
        try:
            tasks = load_eval_suite(self.suite)
        except Exception as err:  # OmegaConf names the unknown or mistyped field
            raise ConfigError(f"{prefix}.suite", self.suite, str(err).splitlines()[0]) from None
        for task in tasks:
            task.cfg.validate(f"{prefix}.suite[{task.name}]", allow_pipe)


# Each evaluator's config, by its kind (``eval/registry.py``): what an ``eval.suite`` entry's ``task`` may name.
TASK_CONFIGS: dict[str, type] = {"zeroshot": ZeroShotConfig, "retrieval": RetrievalConfig}


@dataclass
class EvalTask:
    name: str
    kind: str  # a key of TASK_CONFIGS
    cfg: Any  # its config


def load_eval_suite(path: str | Path) -> list[EvalTask]:
    """An ``eval.suite`` YAML file: a list of {name, task: KIND, dataset, ...that kind's fields} (KIND: a key of
    ``TASK_CONFIGS``).
    Unknown fields fail with their name (merged into the typed configs)."""
    data = yaml_files.load(path)  # (no aliases: a nested-anchor file would expand without bound)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of tasks")
    entries = OmegaConf.create(data)
    tasks = []
    for i, entry in enumerate(entries):
        entry = OmegaConf.to_container(entry)
        name, kind = entry.pop("name", None), entry.pop("task", None)
        if kind not in TASK_CONFIGS:
            raise ValueError(f"{path}: task {i} needs task: {' or '.join(TASK_CONFIGS)} (got {kind!r})")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TASK_CONFIGS[kind]), entry))
        tasks.append(EvalTask(name or f"{kind}_{i}", kind, cfg))
    return tasks
