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
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from clipkit import checkpoint as ckpt
from clipkit import ema as ema_lib
from clipkit.distributed import DistEnv, ensure_process_group
from clipkit.engine.parts import MAX_LOGIT_SCALE, Forward, autocast_dtype, hold_scalars_as_vectors, with_scalar_outputs
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


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the open_clip model and a client AdamW + warmup/cosine schedule.

    Non-finite gradients: DeepSpeed computes the global norm inside ``step`` and, when it is not finite, leaves
    the parameters, the optimizer state and the client schedule untouched (stages 1-3 checked by
    ``tests/integration/test_engines.py``); ``step`` reads that norm and reports the update as not applied, so
    ``train.nonfinite=fail|skip`` mean what they mean on the other engines. DeepSpeed's own ``global_steps``
    counts such steps too; clipkit counts updates itself and never reads it."""

    def __init__(self, model: torch.nn.Module, cfg: RootConfig, env: DistEnv):
        import deepspeed

        ensure_process_group(env, cfg.parallel.timeout_s)
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
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
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

    def step(self) -> tuple[torch.Tensor, bool]:
        self.module.step()  # reduce (scatter), clip, AdamW, schedule, zero_grad; all skipped if the norm is bad
        norm = self.module.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=self.device)
        # The one host read: the norm and the updated temperature (the working copy; under ZeRO-3, where it is
        # partitioned, the fp32 master gathered on the device).
        scale = self.model.logit_scale.detach()
        if scale.numel() == 0:
            from deepspeed.utils import safe_get_full_fp32_param

            scale = safe_get_full_fp32_param(self.model.logit_scale)  # collective under ZeRO-3
        norm_value, scale = torch.stack([norm, scale.reshape(()).float().to(self.device)]).tolist()
        if not math.isfinite(norm_value):
            self.module.zero_grad()
            return norm, False
        if not 0 <= scale <= MAX_LOGIT_SCALE:
            self._clamp_logit_scale()
        if self.ema:
            self.ema.update()
        return norm, True

    def _ema_sources(self) -> dict[str, torch.Tensor]:
        params = ema_lib.trainable(self.model)
        if self.stage < 3:
            return {name: p.detach() for name, p in params.items()}
        return {name: p.ds_tensor for name, p in params.items()}

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
        """Clamps the temperature in DeepSpeed's fp32 master copy and in the module's working copy."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        param = self.model.logit_scale
        master = safe_get_full_fp32_param(param)  # collective under ZeRO-3
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(0, MAX_LOGIT_SCALE))
        with self.full_params(modifier_rank=0), torch.no_grad():
            param.clamp_(0, MAX_LOGIT_SCALE)

    @property
    def lr(self) -> float:
        return scheduled_lr(self.scheduler, self.base_lr)

    def full_params(self, modifier_rank: int | None = None):
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=modifier_rank)

    def save(self, path: Path, background: bool = False) -> None:
        """DeepSpeed's shards (every rank) under ``deepspeed/``; rank 0 adds the full fp32 weights. Synchronous
        (``train.async_checkpoint`` is refused for ZeRO)."""
        self.module.save_checkpoint(str(path), tag=TAG, save_latest=False)
        if self.stage == 3:
            weights = self.module._zero3_consolidated_16bit_state_dict()  # collective; fp32 here (no half mode)
            if weights is not None:  # built from the parameters, not state_dict(): restore the 0-d shapes
                weights = {k: v.reshape(()) if k in self.scalar_names else v for k, v in weights.items()}
        else:
            weights = self.model.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            ckpt.save_tensors(path / "model.safetensors", weights)
            ckpt.save_json(path / "deepspeed_config.json", self.ds_config)
        if self.ema:
            if self.stage == 3:  # each rank's own partitions, for resume (on the same world size)
                ckpt.save_tensors(path / self._ema_partition_file(), self.ema.shadow)
            full = self._full_ema()  # a collective
            if self.rank == 0:
                full = {k: v.reshape(()) if k in self.scalar_names else v for k, v in full.items()}
                ema_lib.save_files(path, full, self.ema.state())

    def load(self, path: Path) -> None:
        loaded, _ = self.module.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ckpt.CorruptCheckpoint(f"{path / TAG}: DeepSpeed could not load its checkpoint")
        if self.ema:  # ZeRO-3 resumes its own partitions (the consolidated file is for eval and export)
            weights = self._ema_partition_file() if self.stage == 3 else ema_lib.EMA_FILE
            self.ema.load_state(*ema_lib.load_files(path, self.device, weights))
