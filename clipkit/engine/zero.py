"""DeepSpeed ZeRO-1/2/3 (``parallel=zero1|2|3``), a sibling of the local, DDP and FSDP engines.

What DeepSpeed does here: partitions optimizer state (1), gradients (2) and parameters (3) over the ranks,
reduces gradients, clips, and steps the *client* torch AdamW (so no fused_adam op has to be compiled). What
stays clipkit's: the forward under torch autocast with fp32 weights (the same numerics as DDP: bf16 matmuls,
fp32 master weights, fp32 gradient reduction), the loss, gradient caching and the schedule.

Choices worth knowing:
- The DeepSpeed JSON is generated from the typed config (``deepspeed_config``) and written into each
  checkpoint for the record; there is no second hand-edited file that could disagree with it.
- Accumulation uses DeepSpeed's unmanaged mode: every ``backward`` only accumulates locally and ``step``
  reduces once, which is what gradient caching's K re-forwards need (``no_sync`` is then a no-op).
- Gradients of several outputs (gradient caching) enter DeepSpeed's ``backward(loss)`` as the surrogate
  scalar sum(output * grad), whose gradient with respect to each output is exactly ``grad``.
- ZeRO-3 runs ``encode_image`` / ``encode_text`` inside the model's ``forward``, so DeepSpeed's hooks gather
  every weight, top-level ones (``logit_scale``, ``positional_embedding``, ``text_projection``) included.
  Eval and export wrap the model in ``full_params()``; checkpoints hold DeepSpeed's own shards (optimizer
  state, fp32 partitions) under ``deepspeed/`` plus the consolidated ``model.safetensors`` that ``clipkit
  eval`` / ``export`` / ``model.init_from`` read without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

from clipkit import checkpoint as ckpt
from clipkit import ema as ema_lib
from clipkit.distributed import DistEnv, ensure_process_group
from clipkit.engine.parts import (
    MAX_LOGIT_SCALE,
    Forward,
    as_scalars,
    autocast_dtype,
    hold_scalars_as_vectors,
    with_scalar_outputs,
)
from clipkit.optim import build_optimizer, build_scheduler, scheduled_lr

if TYPE_CHECKING:
    from clipkit.config import RootConfig

log = logging.getLogger("clipkit")
TAG = "deepspeed"  # the DeepSpeed checkpoint's folder inside clipkit's checkpoint dir


def deepspeed_config(cfg: RootConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON for ``parallel=zero1|2|3``, derived from clipkit's config (and the run's device)."""
    stage = int(cfg.parallel.engine.removeprefix("zero"))
    micro = cfg.train.micro_batch_size or cfg.train.global_batch_size // world_size
    bucket = cfg.parallel.bucket_size_m * 1_000_000
    zero: dict = {
        "stage": stage,
        # DeepSpeed accepts overlap with unmanaged accumulation on stage 2 only.
        "overlap_comm": cfg.parallel.overlap_comm and stage == 2,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
    }
    if stage < 3:
        zero["allgather_bucket_size"] = bucket
    else:
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_param_persistence_threshold"] = 10_000
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    amp = autocast_dtype(cfg.train.precision, device)
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.global_batch_size // (micro * world_size),
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip_norm,
        "zero_optimization": zero,
        # Mixed precision is torch autocast around the forward, weights stay fp32 (DeepSpeed's own bf16/fp16 modes
        # would keep half-precision weights and change the numerics). The engine's forward runs inside DeepSpeed's
        # ``autocast_if_enabled``, which *switches off* an outer CUDA autocast unless this section enables its own:
        # without it ZeRO would train in fp32 on a GPU. No module reduces its gradients in bf16 (DeepSpeed's
        # default for Linear/Conv under this section): gradients are reduced in fp32, as DDP does.
        "torch_autocast": {
            "enabled": True,
            "dtype": str(amp).removeprefix("torch."),
            "lower_precision_safe_modules": [],
        }
        if amp
        else {"enabled": False},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # parallel.offload_optimizer: the client torch AdamW (fused, also on the CPU) steps the offloaded fp32
        # partitions; DeepSpeed refuses a client optimizer with offload unless told so, to push its CPUAdam op
        # (a C++ extension compiled on first use). One AdamW everywhere keeps every engine's update the same.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _skip_shm_op() -> None:
    """On a CPU, DeepSpeed's comm backend builds its shared-memory all-reduce op when it starts: a C++ compile of
    22 s on 2 cores, once per machine (and extensions folder). The op serves only ``inference_all_reduce``, which
    training never calls (its all-reduces are torch's), so it is marked incompatible and DeepSpeed skips it."""
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict) and compatible.get("deepspeed_shm_comm"):
        compatible["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the open_clip model and a client AdamW + warmup/cosine schedule.

    Non-finite gradients: DeepSpeed computes the global norm inside ``step`` and, when it is not finite, leaves
    the parameters, the optimizer state and the client schedule untouched (stages 1-3 checked by
    ``tests/integration/test_engines.py``); ``step`` reads that norm and reports the update as not applied, so
    ``train.nonfinite=fail|skip`` mean what they mean on the other engines. DeepSpeed's own ``global_steps``
    counts such steps too; clipkit counts updates itself and never reads it."""

    def __init__(self, model: torch.nn.Module, cfg: RootConfig, env: DistEnv):
        ensure_process_group(env, cfg.parallel.timeout_s)
        if env.device.type == "cpu":
            _skip_shm_op()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=None)
        self.rank, self.device, self.model = env.rank, env.device, model
        # fp16, torch.compile and channels-last are refused for ZeRO by config validation; bf16 needs no scaler.
        self.amp_dtype = autocast_dtype(cfg.train.precision, env.device)
        self.stage = int(cfg.parallel.engine.removeprefix("zero"))
        self.ds_config = deepspeed_config(cfg, env.world_size, env.device)
        self.scalar_names = hold_scalars_as_vectors(model)  # before the optimizer sees the parameters
        optimizer = build_optimizer(model, cfg.optim, env.device)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self.base_lr = cfg.optim.lr
        # The schedule stays clipkit's (stepped in ``step``, saved in ``engine.pt``): DeepSpeed would hold it on a
        # skipped step, a decision it takes on the host.
        self.scheduler = scheduler
        self.module, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.module.train()
        # train.ema_decay: ZeRO-1/2 average the (replicated, fp32) module weights; ZeRO-3 each rank's flat fp32
        # partitions of them (``ds_tensor``), partitioned like the parameters.
        self.ema = ema_lib.build(cfg, self._ema_sources)
        self._forward = Forward(self.module, env.device, self.amp_dtype, channels_last=False, compile=False)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        out = self._forward(images, text)
        return with_scalar_outputs(out)

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        if grads is None:
            (loss,) = outputs
        else:
            loss = sum((o * g.detach()).sum() for o, g in zip(outputs, grads, strict=True))
        self.module.backward(loss, scale_wrt_gas=False)

    def no_sync(self):
        return contextlib.nullcontext()  # unmanaged accumulation: backward never reduces; step does

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.module.step()  # reduce (scatter), clip, AdamW, zero_grad; skipped by DeepSpeed if the norm is bad
        self.module.zero_grad()  # (DeepSpeed leaves a skipped step's gradients in place)
        self.scheduler.step()  # clipkit's own: the schedule advances every step, as on the other engines
        norm = self.module.get_global_grad_norm()
        if not isinstance(norm, torch.Tensor):
            norm = torch.tensor(float("nan") if norm is None else norm)
        norm = norm.detach().reshape(()).float().to(self.device, non_blocking=True)
        applied = torch.isfinite(norm)  # (DeepSpeed's own decision; clipkit reads nothing on the host here)
        self._clamp_logit_scale()
        if self.ema:
            self.ema.update(applied)
        return norm, applied

    def _ema_sources(self) -> dict[str, torch.Tensor]:
        params = ema_lib.trainable(self.model)
        if self.stage < 3:
            return {name: p.detach() for name, p in params.items()}
        return {name: p.ds_tensor for name, p in params.items()}

    def ema_copy(self, name: str) -> torch.Tensor | None:
        raise NotImplementedError("ZeRO's EMA lives in flat partitions (train.stages, its user, is refused here)")

    def _ema_partition_file(self) -> str:
        return f"ema_rank_{self.rank:05d}.safetensors"

    def _full_ema(self) -> dict[str, torch.Tensor]:
        """The whole EMA weights on every rank (ZeRO-3: one all-gather of every rank's partitions; a collective),
        with the module's shapes (the temperature as a [1] vector)."""
        if self.stage < 3:
            return dict(self.ema.shadow)
        params, names = ema_lib.trainable(self.model), list(self.ema.shadow)
        flat = torch.cat([self.ema.shadow[n].reshape(-1) for n in names])
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        sizes = [self.ema.shadow[n].numel() for n in names]
        pieces = [part.split(sizes) for part in parts]  # [rank][name]
        return {
            name: torch.cat([p[i] for p in pieces])[: params[name].ds_numel].view(params[name].ds_shape)
            for i, name in enumerate(names)
        }

    @contextlib.contextmanager
    def ema_weights(self):
        """``full_params`` over the EMA weights. ZeRO-3 swaps the average into the partitions that every gather
        reads (the forward hooks re-gather from them), and into the small persistent parameters, which stay
        gathered and are never re-read from their partitions; all restored after."""
        if self.stage < 3:
            with self.ema.swapped():
                yield
            return
        full, params = self._full_ema(), ema_lib.trainable(self.model)
        persistent = {  # (gathered now: a gather would skip them; partitioned ones are gathered from the swap)
            name: p
            for name, p in params.items()
            if getattr(p, "ds_persist", False) and p.data.numel() == full[name].numel()
        }
        with self.ema.swapped():
            with torch.no_grad():
                saved = {name: p.data.clone() for name, p in persistent.items()}
                for name, p in persistent.items():
                    p.data.copy_(full[name].view_as(p.data))
            try:
                with self.full_params():
                    yield
            finally:
                with torch.no_grad():
                    for name, p in persistent.items():
                        p.data.copy_(saved[name])

    def _clamp_logit_scale(self) -> None:
        """Clamps the temperature in this rank's piece of DeepSpeed's fp32 master copy and of the working copy,
        on the device and with no collective (every step: whether it is out of range is not read)."""
        param = self.model.logit_scale
        with torch.no_grad():
            if self.stage == 3:
                master = safe_get_local_fp32_param(param)  # (a copy when offloaded: written back below)
                if master is not None and master.numel():
                    safe_set_local_fp32_param(param, master.clamp(0, MAX_LOGIT_SCALE))
                working = param.ds_tensor
            else:
                mapping = getattr(param, "_hp_mapping", None)
                master = mapping.get_hp_fragment() if mapping is not None else None
                if master is not None and master.numel():
                    master.clamp_(0, MAX_LOGIT_SCALE)
                working = param.data
            if working.numel():
                working.clamp_(0, MAX_LOGIT_SCALE)

    @property
    def lr(self) -> float:
        return scheduled_lr(self.scheduler, self.base_lr)

    def full_params(self, modifier_rank: int | None = None):
        if self.stage < 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=modifier_rank)

    def save(self, path: Path, background: bool = False) -> None:
        """DeepSpeed's shards (every rank) under ``deepspeed/``; rank 0 adds the full fp32 weights. Synchronous
        (``train.async_checkpoint`` is refused for ZeRO)."""
        self.module.save_checkpoint(str(path), tag=TAG, save_latest=False)
        if self.stage == 3:
            weights = self.module._zero3_consolidated_16bit_state_dict()  # collective; fp32 here (no half mode)
            if weights is not None:  # built from the parameters, not state_dict(): restore the 0-d shapes
                weights = as_scalars(weights, self.scalar_names)
        else:
            weights = self.model.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            ckpt.save_tensors(path / "model.safetensors", weights)
            ckpt.save_json(path / "deepspeed_config.json", self.ds_config)
            ckpt.save_torch(path / "engine.pt", {"scheduler": self.scheduler.state_dict()})
        if self.ema:
            if self.stage == 3:  # each rank's own partitions, for resume (on the same world size)
                ckpt.save_tensors(path / self._ema_partition_file(), self.ema.shadow)
            full = self._full_ema()  # a collective
            if self.rank == 0:
                full = as_scalars(full, self.scalar_names)
                ema_lib.save_files(path, full, self.ema.state())

    def load(self, path: Path) -> None:
        loaded, _ = self.module.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise ckpt.CorruptCheckpoint(f"{path / TAG}: DeepSpeed could not load its checkpoint")
        if ckpt.listed(path, "engine.pt"):
            self.scheduler.load_state_dict(ckpt.load_torch(path / "engine.pt")["scheduler"])
        else:  # written before the schedule was clipkit's own (it then held on skipped steps): its step count
            step = ckpt.load_json(path / "trainer.json")["step"]
            self.scheduler.last_epoch = step - 1
            self.scheduler.step()
            log.info("%s has no engine.pt (an older ZeRO checkpoint): the schedule resumes at step %d", path, step)
        if self.ema:  # ZeRO-3 resumes its own partitions (the consolidated file is for eval and export)
            weights = self._ema_partition_file() if self.stage == 3 else ema_lib.EMA_FILE
            self.ema.load_state(*ema_lib.load_files(path, self.device, weights))
