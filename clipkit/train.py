"""The training loop: build -> resume -> (step, log, checkpoint, eval)* -> final checkpoint, eval, summary."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import clipkit
from clipkit import checkpoint as ckpt
from clipkit import distributed, faults, lora, report
from clipkit import model as model_lib
from clipkit import run_dir as run_dirs
from clipkit.config import RootConfig, resolve_eval_sets, resumable_keys, saved_config
from clipkit.data import ensure_demo, feature_cache, remote, train_spec
from clipkit.data.config import holdout_every
from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards
from clipkit.data.stream import ShardTable
from clipkit.data.transforms import DeviceNormalize
from clipkit.distill import Teacher
from clipkit.engine import NonFiniteError, build_engine
from clipkit.errors import UserError
from clipkit.eval.config import TASK_CONFIGS
from clipkit.eval.runner import format_table, run_raw_and_ema
from clipkit.loss import build_caption_loss, build_loss
from clipkit.loss.distill import DistillLoss
from clipkit.loss.itm import ITMLoss
from clipkit.metrics import (
    KeyLog,
    RunLogger,
    SpikeDetector,
    Throughput,
    forward_flops_per_sample,
    peak_flops,
    peak_memory_gb,
)
from clipkit.preempt import Preemption, requeue_slurm_job
from clipkit.stage_config import Stage, parse_stages
from clipkit.stages import Stages
from clipkit.step import StepResult, Terms, rng_state, set_rng_state, step_function

log = logging.getLogger("clipkit")


class ResumeError(UserError, RuntimeError):
    """The run dir's checkpoint cannot be resumed by this run (other config or world size)."""


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0


def split_holdout(shards: ShardTable, fraction: float) -> tuple[ShardTable, ShardTable]:
    """``data.holdout_fraction``: every N-th shard (N = round(1/fraction)) is kept out of training, spread over
    the whole spec (every source loses its share); whole shards, so the split is exact and resumes unchanged."""
    every = holdout_every(fraction)
    held = np.arange(len(shards)) % every == every - 1
    return shards.take(~held), shards.take(held)


def build_loader(
    cfg: RootConfig, built: model_lib.Built, env: distributed.DistEnv, demo: Path | None, teacher_tokenizer=None
) -> tuple[TrainLoader, ShardTable | None]:
    """This rank's training loader, and the held-out shards (``data.holdout_fraction``; else None)."""
    remote.configure(cfg.data.stall_timeout_s)  # (planning reads sizes files: bounded like every read)
    shards, weights = resolve_shards(train_spec(cfg.data, demo), cfg.data.allow_pipe, cfg.data.allow_missing_shards)
    held = None
    if cfg.data.holdout_fraction > 0:
        shards, held = split_holdout(shards, cfg.data.holdout_fraction)
        log.info(
            "holding out %d of %d shards (%d samples) for retrieval eval (data.holdout_fraction=%g)",
            len(held),
            len(held) + len(shards),
            int(held.sizes[held.sizes > 0].sum()),
            cfg.data.holdout_fraction,
        )
    decoder = SampleDecoder(
        tuple(cfg.data.image_key.split(";")),
        # The demo's samples carry several captions in json "captions": auto picks among them there.
        "json:captions" if cfg.data.train == "demo" and cfg.data.caption_key == "auto" else cfg.data.caption_key,
        built.image_size,
        (cfg.data.crop_scale_min, cfg.data.crop_scale_max),
        cfg.train.seed,
        cfg.data.caption_mix(),
    )
    streams = cfg.data.stream_count(cfg.train.global_batch_size)
    if not cfg.data.streams and cfg.data.mode == "epoch" and (shards.sizes < 0).any() and len(shards) < streams:
        # Shards of unknown size are read whole, one stream each: fewer of them than streams take fewer streams
        # (still a divisor of the global batch, and still a function of the data, not of the layout).
        streams = max(d for d in range(1, len(shards) + 1) if streams % d == 0)
        log.info("%d shards of unknown size: read as %d streams (data.streams=0)", len(shards), streams)
    loader = TrainLoader(
        shards,
        weights,
        decoder,
        built.tokenizer,
        mode=cfg.data.mode,
        seed=cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.workers(streams // env.world_size),
        batch_size=cfg.train.micro_batch(env.world_size),
        window=cfg.data.shuffle_window,
        streams=streams,
        global_batch=cfg.train.global_batch_size,
        prefetch_factor=cfg.data.prefetch_factor,
        pin_memory=env.device.type == "cuda",
        max_bad_fraction=cfg.data.max_bad_fraction,
        stall_timeout_s=cfg.data.stall_timeout_s,
        retries=cfg.data.remote_retries,
        retry_backoff_s=cfg.data.retry_backoff_s,
        max_member_mb=cfg.data.max_member_mb,
        num_samples=cfg.data.num_samples,
        teacher_tokenizer=teacher_tokenizer,
    )
    return loader, held


def save_checkpoint(
    run_dir: Path, cfg: RootConfig, env, engine, loader: TrainLoader, state: TrainState, lora_digest: str | None = None
) -> Path | ckpt.PendingSave:
    """A collective: every rank contributes its data position and RNG (and, for sharded engines, its shards);
    rank 0 writes the shared files. With ``train.async_checkpoint`` the engine's files are written in the
    background and a ``PendingSave`` comes back. ``lora_digest``: the frozen base weights' SHA-256 (LoRA), which
    the checkpoint does not hold."""
    data_states = distributed.all_gather_object(loader.state_dict())
    rng_states = distributed.all_gather_object(rng_state(env.device))

    def write(tmp: Path):
        background = engine.save(tmp, background=cfg.train.async_checkpoint)
        if env.is_main:
            ckpt.save_torch(tmp / "rng.pt", rng_states)
            ckpt.save_json(
                tmp / "trainer.json",
                {
                    **asdict(state),
                    "data": data_states,
                    "world_size": env.world_size,
                    "clipkit_version": clipkit.__version__,
                },
            )
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            if lora_digest:
                lora.save_state(tmp, lora_digest)
        return background

    return ckpt.save(
        run_dir / "checkpoints",
        state.step,
        write,
        keep_last=cfg.train.keep_last,
        meta={"clipkit_version": clipkit.__version__},
        is_main=env.is_main,
        barrier=distributed.barrier,
        at=faults.at,
    )


def _config_differences(saved: dict, current: dict, resumable: set[str], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in resumable:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, resumable, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs


def saved_tree(path: Path) -> dict:
    """A checkpoint's config as a plain tree, over the schema's defaults: a field added to clipkit after the
    checkpoint was written reads as its default (which is what that run trained with), not as a difference."""
    return OmegaConf.to_container(OmegaConf.structured(saved_config(path)))


def resume(
    run_dir: Path, cfg: RootConfig, env, engine, loader: TrainLoader, state: TrainState, lora_digest: str | None = None
) -> Path | None:
    path = ckpt.find_latest(run_dir / "checkpoints") if env.is_main and cfg.train.resume == "auto" else None
    path = distributed.broadcast_object(str(path) if path else None)
    if path is None:
        return None
    path = Path(path)
    try:
        saved = saved_tree(path)
    except OmegaConfBaseException as err:  # (a field this clipkit no longer has, or a value it no longer takes)
        raise ResumeError(
            f"the checkpoint {path} has a config this clipkit cannot read ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); resume it with the clipkit that wrote it, or start a new run dir"
        ) from None
    diffs = _config_differences(saved, OmegaConf.to_container(OmegaConf.structured(cfg)), resumable_keys())
    if diffs:
        raise ResumeError(
            f"run dir {run_dir} holds a checkpoint of a different config ({'; '.join(diffs)}); use a new "
            "hydra.run.dir / name=..., or train.resume=restart to move that run aside and start over there"
        )
    trainer = ckpt.load_json(path / "trainer.json")
    if trainer["world_size"] != env.world_size and cfg.parallel.is_deepspeed:
        raise ResumeError(
            f"checkpoint {path} was written by {trainer['world_size']} ranks, this run has {env.world_size}: "
            f"DeepSpeed's partitioned state ({cfg.parallel.engine}) resumes on the same world size only "
            "(parallel=ddp and parallel=fsdp reshard)"
        )
    if lora_digest:  # (the adapters only make sense over the base weights they trained on)
        lora.check_base(path, lora_digest, cfg.model)
    engine.load(path)
    note = loader.load_state_dict(trainer["data"])
    if note and env.is_main:
        log.warning(note)
    rngs = ckpt.load_torch(path / "rng.pt")
    if env.rank < len(rngs):  # (a rank the old run did not have keeps its seeded generator)
        set_rng_state(rngs[env.rank], env.device)
    state.step, state.samples_seen = trainer["step"], trainer["samples_seen"]
    return path


def summed_data_errors(loader: TrainLoader) -> dict:
    """Skipped-sample counts over all ranks, in total and per epoch, and (``data.captions``) the samples trained
    with each caption source (collective)."""
    total, by_epoch, sources = collections.Counter(), {}, collections.Counter()
    mine = (dict(loader.errors), loader.errors_by_epoch(), dict(loader.caption_sources))
    for errors, epochs, used in distributed.all_gather_object(mine):
        total.update(errors)
        sources.update(used)
        for epoch, kinds in epochs.items():
            by_epoch.setdefault(epoch, collections.Counter()).update(kinds)
    return {
        **({"caption_sources": dict(sorted(sources.items()))} if sources else {}),
        "data_errors": dict(sorted(total.items())),
        "data_errors_by_epoch": {
            e: dict(sorted(c.items())) for e, c in sorted(by_epoch.items(), key=lambda x: int(x[0]))
        },
    }


class NonFinitePolicy:
    """``train.nonfinite`` for the steps whose gradient norm was not finite (nothing of them was applied, decided
    on the device; every rank holds the same flags). Enforced when the loop reads the flags (``read_steps``: at
    a log, and before a checkpoint, an eval or a stop): ``fail`` raises naming the first such step; ``skip``
    reports each, until more than ``max_in_a_row`` in a row, which raises."""

    def __init__(self, policy: str, max_in_a_row: int):
        self.policy, self.max_in_a_row, self.in_a_row = policy, max_in_a_row, 0

    def check(self, read: StepsRead, env: distributed.DistEnv) -> list[tuple[int, str]]:
        """(step, reason) of each skipped step in ``read``; raises ``NonFiniteError`` as the policy says."""
        skipped = []
        for step, applied, loss, norm in zip(read.steps, read.applied, read.losses, read.grad_norms, strict=True):
            if applied:
                self.in_a_row = 0
                continue
            reason = self.reason(step, loss, norm, env)
            if self.policy == "fail":
                raise NonFiniteError(reason)
            self.in_a_row += 1
            if self.in_a_row > self.max_in_a_row:
                raise NonFiniteError(
                    f"{self.in_a_row} non-finite steps in a row (train.max_nonfinite_skips={self.max_in_a_row}); "
                    f"last: {reason}"
                )
            skipped.append((step, reason))
        return skipped

    @staticmethod
    def reason(step: int, own_loss: float, norm: float, env: distributed.DistEnv) -> str:
        # The rare path may talk: which ranks' losses were non-finite (one tiny all-gather; every rank is here
        # for the same steps, since the flags are the same everywhere).
        finite = distributed.flags_of_all_ranks(math.isfinite(own_loss), env.device)
        if not all(finite):
            bad = ", ".join(str(r) for r, ok in enumerate(finite) if not ok)
            return f"non-finite loss at step {step} on rank {bad}; no update was applied"
        return (
            f"non-finite gradient (norm {norm}) at step {step} on rank {env.rank} (and every other: gradients are "
            "reduced); no update was applied"
        )


@dataclass
class StepsRead:
    """What one host read of the steps since the last one gives (``read_steps``)."""

    steps: list[int]
    losses: list[float]  # this rank's loss of each step (its own rows)
    applied: list[bool]
    grad_norms: list[float]
    # the last step's global-batch loss (averaged over ranks), grad norm and temperature; on a logging read only
    shared: tuple[float, float, float] | None = None
    terms: dict[str, float] = dataclasses.field(default_factory=dict)  # the last step's ``terms``, averaged


def canonical_rows(batches: list[dict]) -> torch.Tensor | None:
    """This rank's rows' places in the step's canonical global batch (the loader's ``rows``), in the order the step
    concatenates its micro-batches: what makes ITM's negatives the same on every layout."""
    if not all("rows" in b for b in batches):
        return None
    return torch.tensor([r for b in batches for r in b["rows"]], dtype=torch.int64)


def read_steps(pending: list[tuple[int, StepResult]], world_size: int, log: bool) -> StepsRead:
    """The loop's one host read of the steps since the last read (one transfer): each step's own loss, whether
    its update was applied and its grad norm; with ``log``, also the last step's loss averaged over ranks (each
    rank's loss covers its own rows), grad norm and temperature (the same everywhere)."""
    results = [r for _, r in pending]
    last = results[-1]
    dtype = torch.float64 if last.loss.device.type != "mps" else torch.float32
    parts = [torch.stack([r.loss.to(dtype) for r in results])]
    parts.append(torch.stack([r.applied.to(dtype) for r in results]))
    parts.append(torch.stack([r.grad_norm.to(last.loss.device, dtype) for r in results]))
    names = sorted(last.terms) if log else []
    if log:
        scalars = [last.loss, last.grad_norm.to(last.loss.device), last.logit_scale, *(last.terms[k] for k in names)]
        shared = torch.stack(scalars).to(dtype)
        if world_size > 1:
            torch.distributed.all_reduce(shared)
            shared /= world_size
        parts.append(shared)
    values, n = torch.cat(parts).tolist(), len(results)
    return StepsRead(
        steps=[step for step, _ in pending],
        losses=values[:n],
        applied=[v == 1.0 for v in values[n : 2 * n]],
        grad_norms=values[2 * n : 3 * n],
        shared=tuple(values[3 * n : 3 * n + 3]) if log else None,
        terms=dict(zip(names, values[3 * n + 3 :], strict=True)),
    )


class Checkpoints:
    """The loop's checkpoint saves: one at a time (an asynchronous save is waited for before the next, and at the
    end), with the seconds the step loop was held up by them since the last log."""

    def __init__(self, save):
        self.save_fn, self.pending, self.blocked_s = save, None, 0.0

    def save(self) -> None:
        t0 = time.perf_counter()
        self.wait()
        out = self.save_fn()
        self.pending = out if isinstance(out, ckpt.PendingSave) else None
        self.blocked_s += time.perf_counter() - t0

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait()

    def take_blocked_s(self) -> float:
        blocked, self.blocked_s = self.blocked_s, 0.0
        return blocked


def evaluate(cfg: RootConfig, built, env, engine, demo: Path | None, held: ShardTable | None) -> dict:
    """Every rank embeds its share of each eval set; rank 0 gets the metrics (the others an empty dict).
    ``eval.retrieval.dataset=holdout`` reads the shards ``data.holdout_fraction`` kept out of training. With
    EMA weights, ``eval.use_ema`` picks raw, EMA (results named ``NAME_ema``) or both."""
    eval_cfg = cfg.eval
    if eval_cfg.retrieval.dataset == "holdout" and held is not None:
        retrieval = dataclasses.replace(eval_cfg.retrieval, dataset="::".join(held.urls))
        eval_cfg = dataclasses.replace(eval_cfg, retrieval=retrieval)
    ema = engine.ema_weights if engine.ema is not None else None  # (eval.use_ema=ema is refused without EMA)
    return run_raw_and_ema(built, eval_cfg, env.device, demo, engine.full_params, ema, cfg.logging.progress)


def eval_sets(cfg: RootConfig, held: ShardTable | None) -> dict:
    """What the end-of-run eval measures, in words (summary.json and the last lines a run prints)."""
    out = {}
    for name in TASK_CONFIGS:  # (each evaluator kind's config is the eval config's field of that name)
        dataset = getattr(cfg.eval, name).dataset
        if dataset == "demo":
            out[name] = "the demo's held-out split (templates and images never trained on)"
        elif dataset == "holdout" and held is not None:
            out[name] = (
                f"{len(held)} held-out shards of data.train (data.holdout_fraction={cfg.data.holdout_fraction:g}), "
                "never trained on"
            )
        elif dataset:
            out[name] = dataset
    if cfg.eval.suite:
        out["suite"] = cfg.eval.suite
    return out or {
        "none": "no eval set configured (data.holdout_fraction, eval.zeroshot/retrieval.dataset, eval.suite)"
    }


def train(cfg: RootConfig, run_dir: Path) -> dict:
    """Builds, resumes and runs one training run; returns its summary. From the first line a signal ends the run
    (at a step boundary once the loop runs); on an error or interrupt the loader's workers are killed at once."""
    with contextlib.ExitStack() as stack:
        preemption = stack.enter_context(contextlib.closing(Preemption()))
        return Trainer(cfg, Path(run_dir), stack).run(preemption)


class Trainer:
    """One run, built in one place (``__init__``: run dir, process group, model, engine, losses, loader, logger,
    checkpoints; what must be closed is registered on ``stack``), and its loop (``run``)."""

    def __init__(self, cfg: RootConfig, run_dir: Path, stack: contextlib.ExitStack):
        for note in resolve_eval_sets(cfg):  # (the CLI did this already; a config built in Python may not have)
            log.warning(note)
        self.cfg, self.run_dir, self.state = cfg, run_dir, TrainState()
        self.env = env = distributed.init(cfg.train.device, cfg.parallel.timeout_s, cfg.train.tf32)
        if env.is_main:  # one run per run dir: held until this process ends, however it ends
            run_dirs.lock(run_dir)
            aside = run_dirs.refuse_or_move_aside(run_dir, cfg.train.resume)
            if aside:
                log.warning("train.resume=restart: the earlier run in %s moved to %s", run_dir, aside)
        distributed.barrier()
        uses_demo = "demo" in (cfg.data.train, cfg.eval.zeroshot.dataset, cfg.eval.retrieval.dataset)
        self.demo = ensure_demo(cfg.data, say=lambda m: log.info(m)) if uses_demo else None

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        built, said = model_lib.build_for_training(cfg.model, env.device, cfg.loss.itm_head)  # (init_from, locks...)
        self.built = built
        # (model.lora: the frozen base weights' digest, which every checkpoint records and a resume checks)
        self.lora_digest = lora.base_digest(built.model) if cfg.model.lora.on else None
        plan = parse_stages(cfg.train.stages, cfg.train.steps, cfg.model)
        self.stages = Stages(plan, built.model) if plan else None  # (also before any engine)
        self.flops_of = {s.index: self._count_flops(s) for s in plan} if plan else {}
        self.train_flops = None if plan else self._count_flops()  # (staged: the stage's, from _enter_stage)
        # (data.cache_*_features: a locked tower's digest names its cache; taken before any engine shards it)
        digests = feature_cache.tower_digests(built.model, feature_cache.kinds_of(cfg))
        self.engine = build_engine(built.model, cfg, env)
        self.step = step_function(self.engine, cfg.train.compile)
        self.peak = peak_flops(env.device, self.engine.amp_dtype, cfg.logging.peak_tflops)
        self.loss_fn = build_loss(cfg.loss.name, cfg.loss.impl, cfg.loss.chunk_size, cfg.loss.contrastive_weight)
        self.caption = build_caption_loss(cfg, built.model)  # CoCa: the captioning term beside the contrastive one
        self.teacher = None
        if cfg.distill.teacher:  # the teacher sees the same samples; the loss adds the distillation term
            self.teacher = Teacher(cfg.distill, built, env.device)
            self.loss_fn = DistillLoss(
                self.loss_fn, cfg.distill.weight, cfg.distill.kind, cfg.loss.impl, cfg.loss.chunk_size
            )
        self.itm = ITMLoss(cfg.loss.itm_weight, cfg.train.seed) if cfg.loss.itm_head is not None else None
        self.loss_fn = faults.loss_hook(self.loss_fn, lambda: self.state.step + 1)  # (inert without CLIPKIT_FAULTS)
        self.num_micro = cfg.train.global_batch_size // (env.world_size * cfg.train.micro_batch(env.world_size))
        self.normalize = DeviceNormalize(built.mean, built.std).to(env.device)
        teacher_tokenizer = self.teacher.tokenizer if self.teacher and not cfg.data.cache_teacher_features else None
        self.loader, self.held = build_loader(cfg, built, env, self.demo, teacher_tokenizer)
        stack.push(lambda exc_type, *_: self.loader.close(kill=exc_type is not None))  # (see stop_workers)
        self.cached_features = None
        if feature_cache.kinds_of(cfg):  # the loader then hands over those towers' embeddings, not their inputs
            args = (self.normalize, self.loader, digests, self.teacher)
            self.cached_features = feature_cache.attach(cfg, env, self.engine, built, *args)
            if cfg.data.cache_teacher_features:  # (the teacher's model is no longer needed)
                self.teacher = feature_cache.CachedTeacher.of(self.teacher)
        self.evaluated_on = eval_sets(cfg, self.held)
        resumed = resume(run_dir, cfg, env, self.engine, self.loader, self.state, self.lora_digest)
        if self.stages:  # (a checkpoint taken at a switch already holds the carried-over embedding)
            self._enter_stage(self.stages.at(self.state.step + 1))
        if env.is_main:  # only now: a refused resume leaves the run dir describing the run that ran there
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

        self.logger = self._open_logger(said, resumed)
        if self.stages:
            self.logger.write(self.stages.describe(self.state.step + 1))
        self.checkpoints = Checkpoints(
            lambda: save_checkpoint(run_dir, cfg, env, self.engine, self.loader, self.state, self.lora_digest)
        )
        self.last_saved = self.state.step if resumed else -1
        self.nonfinite = NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_nonfinite_skips)
        # Agreeing on a signal is a collective and a host read: every N steps (every step when alone).
        self.check_every = cfg.parallel.signal_check_every if env.world_size > 1 else 1
        self.spikes, self.spiked = SpikeDetector(), False
        self.pending: list[tuple[int, StepResult]] = []  # steps not yet read on the host
        self.key_log = KeyLog(run_dir, env.rank, self.state.step) if cfg.train.record_keys else None

    def run(self, preemption: Preemption) -> dict:
        cfg, state, global_batch = self.cfg, self.state, self.cfg.train.global_batch_size
        self.meter, t_start, stop_signal = Throughput(), time.perf_counter(), 0
        preemption.started()
        self.built.model.train()
        while state.step < cfg.train.steps:
            t0 = time.perf_counter()
            batches = [next(self.loader) for _ in range(self.num_micro)]
            data_wait = time.perf_counter() - t0
            lr = self.engine.lr
            # No host read: a non-finite step is skipped on the device (nothing applied; its batch is not retried)
            # and train.nonfinite is enforced when the steps are read (settle).
            itm = None
            if self.itm:  # (the step's seeded draws; rows: each sample's place in the canonical global batch)
                rows, n = canonical_rows(batches), sum(len(b["keys"]) for b in batches) * self.env.world_size
                itm = self.itm.at(state.step + 1, rows, n, self.env.device)
            terms = Terms(self.teacher, self.caption, itm)
            result = self.step(self.engine, self.loss_fn, self._on_device(batches), terms)
            if itm:
                result.terms.update(itm.logged)
            if self.key_log:
                self.key_log.write(state.step + 1, batches)
            state.step += 1
            state.samples_seen += global_batch
            self.meter.add(global_batch, data_wait)
            self.pending.append((state.step, result))
            if self.stages and self.stages.switches_after(state.step):
                self._switch_stage()

            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                self._log_step(lr)
            if state.step % cfg.train.checkpoint_every == 0:
                self.settle()  # (a checkpoint never holds a step the policy has not seen)
                self.checkpoints.save()
                self.last_saved = state.step
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.train.steps:
                self.settle()
                faults.at("eval", state.step)
                self._log_eval(evaluate(cfg, self.built, self.env, self.engine, self.demo, self.held))
            faults.at("step", state.step)
            if state.step % self.check_every == 0 or state.step == cfg.train.steps:
                stop_signal = preemption.agreed(self.env.device)  # any rank's SIGTERM/SIGUSR1 stops every rank
                if stop_signal:
                    break

        self.settle()
        if self.last_saved != state.step:
            self.checkpoints.save()
        self.checkpoints.wait()  # (an asynchronous save published before anything else happens)
        preemption.close()
        return self._stopped(stop_signal) if stop_signal else self._finish(t_start)

    def _count_flops(self, stage: Stage | None = None) -> float | None:
        """Training FLOPs per sample, counted once (per stage: its image size and patch dropout) on the real model
        before any wrapper (MFU = achieved / peak)."""
        built = self.built
        size = built.image_size
        if stage is not None:
            self.stages.enter(stage)
            size = stage.image_size
        try:
            return 3 * forward_flops_per_sample(built.model, size, built.context_length, self.env.device)
        except Exception as err:  # an exotic model the counter cannot trace: no MFU, training goes on
            log.warning("could not count the model's FLOPs (%s); MFU will not be reported", err)
            return None

    def _enter_stage(self, stage: Stage) -> None:
        """The model, the loader and the MFU count take ``stage``'s image size and patch dropout."""
        self.stages.enter(stage)
        self.loader.set_image_size(stage.image_size)
        self.train_flops = self.flops_of[stage.index]

    def _switch_stage(self) -> None:
        """After the last step of a stage (before that step's checkpoint): the embedding it trained carried over
        to the model's grid, then the next stage entered."""
        step, stages = self.state.step, self.stages
        stages.carry_over(stages.at(step), self.engine.ema_copy("visual.positional_embedding"))
        self._enter_stage(stages.at(step + 1))
        self.logger.write(stages.describe(step + 1))

    def _open_logger(self, model_lines: list[str], resumed: Path | None) -> RunLogger:
        cfg, env, built = self.cfg, self.env, self.built
        wandb = {
            "project": cfg.logging.wandb_project,
            "entity": cfg.logging.wandb_entity,
            "mode": cfg.logging.wandb_mode,
        }
        logger = RunLogger(
            self.run_dir,
            env.is_main,
            cfg.train.steps,
            self.state.step,
            cfg.logging.progress,
            wandb if cfg.logging.wandb else None,
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            tensorboard=cfg.logging.tensorboard,
        )
        for line in model_lines:  # (locks, LoRA adapters)
            logger.write(line)
        for kind, c in (self.cached_features or {}).items():
            logger.write(f"cached {kind} features: {c['done']} of {c['shards']} shards in {c['folder']} "
                         f"({c['embedded']} embedded now: {c['rows']} rows in {c['seconds']:.1f} s)")  # fmt: skip
        if self.teacher:
            logger.write(f"distilling from {cfg.distill.teacher} ({cfg.distill.kind}, weight {cfg.distill.weight:g}): "
                         f"{self.teacher.describe()}")  # fmt: skip
        if resumed:
            logger.write(f"resumed from {resumed} (step {self.state.step}, {self.state.samples_seen} samples seen)")
        flops, peak = self.train_flops, self.peak
        logger.write(
            f"model {built.name}: {sum(p.numel() for p in built.model.parameters()) / 1e6:.2f}M params; "
            f"world size {env.world_size}, device {env.device}, global batch {cfg.train.global_batch_size}"
            + (f"; {flops / 3e9:.2f} GFLOPs forward per sample" if flops else "")
            + (f", peak {peak / 1e12:.0f} TFLOP/s per device" if peak else "")
        )
        return logger

    def _on_device(self, batches: list[dict]) -> list[tuple]:
        device = self.env.device
        return [
            (
                # (data.cache_image_features: the locked tower's embeddings, float B x D, stand in for the pixels;
                # text and teacher_text may be cached rows too)
                self.normalize(b["image"].to(device, non_blocking=True))
                if b["image"].dtype == torch.uint8
                else b["image"].to(device, non_blocking=True),
                b["text"].to(device, non_blocking=True),
                *([b["teacher_text"].to(device, non_blocking=True)] if "teacher_text" in b else []),
            )
            for b in batches
        ]

    def settle(self, log: bool = False) -> StepsRead | None:
        """Reads the pending steps (one transfer) and enforces train.nonfinite on them; reports skipped steps."""
        if not self.pending:
            return None
        read = read_steps(self.pending, self.env.world_size, log)
        self.pending.clear()
        for step, reason in self.nonfinite.check(read, self.env):  # (raises for fail, or too many in a row)
            self.logger.log({"step": step, "samples_seen": step * self.cfg.train.global_batch_size, "skipped": reason})
            self.logger.write(f"skipped: {reason}")
            faults.at("skip", step)
        return read

    def _log_step(self, lr: float) -> None:
        read = self.settle(log=True)
        for step, value, applied in zip(read.steps, read.losses, read.applied, strict=True):
            if applied and self.spikes.update(value):
                self.spiked = True
                self.logger.write(f"loss spike at step {step}: {value:.4f} (recent mean {self.spikes.mean:.4f})")
        record = self._record(read, lr)
        self.spiked = False
        self.logger.log(record)
        shown = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.2e}", "samples/s": f"{record['samples_per_s']:.0f}"}
        if record["mfu"] is not None:
            shown["mfu"] = f"{100 * record['mfu']:.1f}%"
        shown["wait"] = f"{record['data_wait_pct']:.0f}%"
        self.logger.progress(self.state.step, shown)

    def _record(self, read: StepsRead, lr: float) -> dict:
        """The metrics.jsonl row of a logged step."""
        loss_value, grad_norm, logit_scale = read.shared
        samples_per_s, wait_pct = self.meter.rate()
        per_rank = samples_per_s / self.env.world_size
        flops, peak = self.train_flops, self.peak
        return {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "epoch": round(self.loader.epoch, 4),
            "loss": loss_value,
            "lr": lr,
            "logit_scale": logit_scale,
            "grad_norm": grad_norm,
            "samples_per_s": samples_per_s,
            "samples_per_s_per_rank": per_rank,
            "mfu": per_rank * flops / peak if flops and peak else None,
            "data_wait_pct": wait_pct,
            "peak_mem_gb": peak_memory_gb(self.env.device),
            "data_errors": dict(self.loader.errors),  # this rank's (rank 0); summary.json sums all ranks
            "data_retries": self.loader.retried,  # transient remote read errors retried (rank 0)
            "loss_spike": self.spiked,  # (rank 0's own rows; a warning, never an action)
            "skipped_steps": read.applied.count(False),  # non-finite steps since the last log (skip policy)
            "checkpoint_s": self.checkpoints.take_blocked_s(),  # the step loop held up by saves since the last log
            **read.terms,  # (loss.itm_weight: itm_loss, the unweighted term, and itm_accuracy)
        }

    def _log_eval(self, results: dict) -> None:
        self.logger.log({"step": self.state.step, "samples_seen": self.state.samples_seen, "eval": results})
        self.logger.write(f"eval @ step {self.state.step}:\n{format_table(results)}")

    def _stopped(self, stop_signal: int) -> dict:
        name = signal.Signals(stop_signal).name
        state = self.state
        self.logger.write(
            f"{name}: stopped after step {state.step} with a complete checkpoint; the same command resumes"
        )
        self.logger.close()
        if stop_signal == signal.SIGUSR1 and self.cfg.parallel.requeue and self.env.is_main:
            requeue_slurm_job()
        distributed.destroy()
        return {"step": state.step, "samples_seen": state.samples_seen, "stopped_by": name}

    def _finish(self, t_start: float) -> dict:
        """The final eval, summary.json (its ``train_time_s`` counts from the first step to here, the final eval
        included), the printed results and the report."""
        cfg, env, state, run_dir = self.cfg, self.env, self.state, self.run_dir
        results = evaluate(cfg, self.built, env, self.engine, self.demo, self.held)
        if results:  # the final eval reaches metrics.jsonl and wandb too, not only summary.json
            self.logger.log({"step": state.step, "samples_seen": state.samples_seen, "eval": results})
        self.logger.close()
        summary = {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "train_time_s": time.perf_counter() - t_start,
            **summed_data_errors(self.loader),
            **({"cached_features": self.cached_features} if self.cached_features else {}),
            "eval": results,
            "evaluated_on": self.evaluated_on,
        }
        if env.is_main:
            summary["environment"] = report.environment(env.world_size, env.device)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"\nzero-shot evaluation after {state.step} steps ({run_dir}):\n{format_table(results)}", flush=True)
            print("evaluated on: " + "; ".join(f"{k}: {v}" for k, v in self.evaluated_on.items()), flush=True)
            if cfg.logging.report:
                try:
                    print(f"report: {report.write_report(run_dir)}", flush=True)
                except Exception as err:  # a plot must never fail a finished run
                    log.warning("report.html not written: %s: %s", type(err).__name__, err)
        distributed.destroy()
        return summary
