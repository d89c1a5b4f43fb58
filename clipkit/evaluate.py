"""``clipkit eval``: load a model from a run dir, a checkpoint dir or the config, evaluate, print, write JSON."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from clipkit import checkpoint as ckpt
from clipkit import distributed, lora
from clipkit import ema as ema_lib
from clipkit import model as model_lib
from clipkit.config import RootConfig, saved_config
from clipkit.data import ensure_demo
from clipkit.data.config import DataConfig
from clipkit.errors import UserError
from clipkit.eval.runner import format_table, run_raw_and_ema

log = logging.getLogger("clipkit")


class NoEmaWeights(UserError, ValueError):
    """EMA weights were asked for (``weights=ema``, ``eval.use_ema=ema``) and the checkpoint has none."""

    kind = "eval error"


def load_trained(path: Path, device: torch.device, weights: str = "raw") -> tuple[model_lib.Built, RootConfig]:
    """The model of a clipkit checkpoint, built from the config it carries, with its raw or its EMA weights (and
    its ITM head, when it trained one: ``itm.detach`` takes it off)."""
    saved_cfg = saved_config(path)
    saved = ckpt.load_tensors(path / "model.safetensors", device)
    if saved_cfg.model.lora.on:  # adapters only: the frozen weights come from the base, as in training
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(saved_cfg.train.seed)  # (a tower left at its seeded init: the one training had)
            built, _ = model_lib.build_for_training(saved_cfg.model, device, saved_cfg.loss.itm_head)
        lora.check_base(path, lora.base_digest(built.model), saved_cfg.model)
        lora.load_saved(built.model, saved, path)
    else:
        built = model_lib.build(saved_cfg.model, device)
        model_lib.add_itm_head(built.model, saved_cfg.model, saved_cfg.loss.itm_head)
        model_lib.load_weights(built.model, saved, "checkpoint", path)
    if weights == "ema":
        use_ema_weights(built.model, path, device)
    if saved_cfg.model.lora.on:
        lora.merged(built.model)
    return built, saved_cfg


def use_ema_weights(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Loads checkpoint ``path``'s EMA weights over the model's trainable parameters."""
    if ema_lib.ema_weights(path) is None:
        raise NoEmaWeights(
            f"{path} has no EMA weights ({ema_lib.EMA_FILE}): the run trained with train.ema_decay=0; "
            "use the raw weights (weights=raw, eval.use_ema=raw)"
        )
    _, averaged = ema_lib.load_files(path, device)
    model.load_state_dict(ema_lib.with_ema(model.state_dict(), averaged))


def evaluate_command(cfg: RootConfig, run_dir: Path) -> dict:
    """Evaluates on every rank of the job (torchrun / SLURM / one process); rank 0 prints and writes JSON."""
    env = distributed.init(cfg.train.device, cfg.parallel.timeout_s, cfg.train.tf32)
    device = env.device
    out = Path(cfg.eval.output) if cfg.eval.output else Path(run_dir) / "eval.json"
    if env.is_main:  # (checked before anything is computed: a read-only place would lose the results at the end)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise PermissionError(errno.EACCES, "cannot write the eval results (eval.output=FILE elsewhere?)", str(out))
    data_cfg: DataConfig = cfg.data
    ema_path = None
    if cfg.checkpoint and (Path(cfg.checkpoint).expanduser() / "open_clip_config.json").is_file():
        built = model_lib.from_open_clip_folder(Path(cfg.checkpoint), device)
        source = f"open_clip folder {cfg.checkpoint}"
    elif cfg.checkpoint:
        path = ckpt.resolve(Path(cfg.checkpoint))
        built, saved_cfg = load_trained(path, device)
        data_cfg = replace(cfg.data, cache_dir=saved_cfg.data.cache_dir, demo=saved_cfg.data.demo)
        source = str(path)
        ema_path = path if ema_lib.ema_weights(path) else None
    else:
        built = model_lib.build(cfg.model, device)
        source = f"{cfg.model.name}" + (f" ({cfg.model.pretrained})" if cfg.model.pretrained else " (random init)")
    uses_demo = "demo" in (cfg.eval.zeroshot.dataset, cfg.eval.retrieval.dataset)
    demo = ensure_demo(data_cfg, say=lambda m: log.info(m)) if uses_demo else None  # file-locked across ranks
    t0 = time.perf_counter()
    use = cfg.eval.use_ema
    if use == "ema" and ema_path is None:
        raise NoEmaWeights(f"eval.use_ema=ema: {source} has no EMA weights (a run trained with train.ema_decay > 0)")
    ema = None
    if ema_path is not None:

        @contextlib.contextmanager
        def ema():  # (the last evaluation of this process: the raw weights need not come back)
            use_ema_weights(built.model, ema_path, device)
            yield

    results = run_raw_and_ema(built, cfg.eval, device, demo, contextlib.nullcontext, ema, cfg.logging.progress)
    if env.is_main:
        record = {
            "model": source,
            "world_size": env.world_size,
            "eval": results,
            "eval_time_s": time.perf_counter() - t0,
        }
        out.write_text(json.dumps(record, indent=1))
        print(f"evaluation of {source}:\n{format_table(results)}\nwritten to {out}", flush=True)
    distributed.destroy()
    return results
