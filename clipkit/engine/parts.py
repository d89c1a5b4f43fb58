"""The parts engines are composed of: the autocast forward (with torch.compile and channels-last), the torch
optimizer update (clip, finite check, AdamW, schedule, temperature clamp, fp16 scaling), and plain checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clipkit import checkpoint as ckpt
from clipkit import ema as ema_lib
from clipkit import lora
from clipkit.optim import (
    build_optimizer,
    build_scheduler,
    hold_lr_as_tensors,
    init_adamw_state,
    masked_adamw_,
    scheduled_lr,
)

if TYPE_CHECKING:
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv

log = logging.getLogger("clipkit")
MAX_LOGIT_SCALE = math.log(100)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` (None = full fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def hold_scalars_as_vectors(model: torch.nn.Module, hooks: bool = True) -> list[str]:
    """Re-registers the model's 0-d parameters (``logit_scale``, ``logit_bias``) as 1-element vectors.

    DeepSpeed 0.19 cannot broadcast (``view(uint8)``) or partition 0-d tensors, and FSDP2 shards along dim 0.
    Inside the engine they are shape [1]; with ``hooks``, ``state_dict()`` / ``load_state_dict()`` keep
    open_clip's 0-d shapes for checkpoints and exports (without, the engine reshapes its consolidated weights
    itself); the engines' ``forward`` hands the loss 0-d views.
    """
    names = []
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            names.append(name)

    def to_scalars(module, state, prefix, local_metadata):
        for name in names:
            if prefix + name in state and state[prefix + name].numel() == 1:  # (ZeRO-3 partitions are empty)
                state[prefix + name] = state[prefix + name].reshape(())

    def to_vectors(module, state, prefix, *args):
        for name in names:
            if prefix + name in state and state[prefix + name].dim() == 0:
                state[prefix + name] = state[prefix + name].reshape(1)

    if hooks:
        model.register_state_dict_post_hook(to_scalars)
        model.register_load_state_dict_pre_hook(to_vectors)
    return names


def as_scalars(weights: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """``weights`` with the tensors named in ``names`` back in open_clip's 0-d shape (a consolidated state dict
    built from the engine's [1]-shaped parameters; see ``hold_scalars_as_vectors``)."""
    return {k: v.reshape(()) if k in names else v for k, v in weights.items()}


def with_scalar_outputs(out: dict) -> dict:
    """The model's outputs with the temperature and bias as 0-d views again (see ``hold_scalars_as_vectors``)."""
    for key in ("logit_scale", "logit_bias"):
        if out.get(key) is not None:
            out[key] = out[key].reshape(())
    return out


class Forward:
    """Calls ``module`` under autocast (and channels-last images); with ``compile``, through torch.compile, which
    is lazy: if the first compiled call fails, training goes on in eager mode with a warning.

    ``compile_blocks`` compiles those submodules' forwards in place instead of the whole module (FSDP2: each
    transformer block is compiled *before* ``fully_shard`` wraps it, so that FSDP's unshard/reshard hooks stay
    outside the compiled graphs; activation checkpointing, applied by the tower around each block call, stays
    outside too). Construct the Forward before sharding."""

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        amp_dtype,
        channels_last: bool,
        compile: bool,
        compile_blocks: list[torch.nn.Module] | None = None,
    ):
        self.module, self.device, self.amp_dtype, self.channels_last = module, device, amp_dtype, channels_last
        self.blocks = list(compile_blocks or []) if compile else []
        for block in self.blocks:
            block.forward = torch.compile(block.forward)  # an instance attribute: `del` restores eager
        self.compiled = module if self.blocks else (torch.compile(module) if compile else None)
        self.checked = False

    def _to_eager(self) -> None:
        for block in self.blocks:
            del block.forward
        self.blocks, self.compiled = [], None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, images: torch.Tensor | None, text: torch.Tensor | None) -> dict:
        """(``None`` for a tower skips it: gradient caching does not re-forward a fully locked tower.)"""
        if self.channels_last and images is not None:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            if self.compiled is None:
                return self.module(images, text)
            if self.checked:
                return self.compiled(images, text)
            start = time.perf_counter()
            try:
                out = self.compiled(images, text)
                self.checked = True
                what = f"{len(self.blocks)} blocks" if self.blocks else "the model"
                log.info("torch.compile: %s compiled (first call %.0f s)", what, time.perf_counter() - start)
                return out
            except Exception as err:  # dynamo / inductor failures surface at the first call
                log.warning("torch.compile failed (%s: %s); training in eager mode", type(err).__name__, err)
                self._to_eager()
                return self.module(images, text)


class TorchUpdate:
    """AdamW + warmup/cosine schedule over ``model``'s parameters, with global-norm clipping, a finite check before
    the update, the temperature clamp after it, and fp16 loss scaling when ``train.precision=fp16``.

    The finite check stays on the device: the fused AdamW kernel takes it as ``found_inf`` and leaves parameters,
    moments and step counts untouched when the norm is not finite; the EMA follows the same flag; the schedule
    advances every step (a skipped step is a step). Nothing is read on the host: the loop reads the flag with
    the loss when it logs (``train.nonfinite``). Only an optimizer without that kernel (MPS) reads it at once.

    ``traced`` (``train.compile=step``): ``apply`` is compiled inside the step, so the update is
    ``optim.masked_adamw_`` (traceable, the same flag) and the learning rate a tensor; ``finish`` stays eager."""

    def __init__(
        self, model: torch.nn.Module, cfg: RootConfig, device: torch.device, amp_dtype, ema=None, traced=False
    ):
        self.model, self.ema, self.device, self.traced = model, ema, device, traced  # (ema: moved after updates)
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        if traced:
            self._prepare_traced()
            # (torch warns when the schedule steps and ``optimizer.step()`` never ran: here the update ran first,
            # as masked_adamw_, so no learning rate of the schedule is skipped)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        self.base_lr = cfg.optim.lr
        self.max_norm = cfg.optim.grad_clip_norm if cfg.optim.grad_clip_norm > 0 else float("inf")
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def _prepare_traced(self) -> None:
        """What ``masked_adamw_`` reads, made outside the compiled region: tensor learning rates and the state."""
        hold_lr_as_tensors(self.optimizer, self.device)
        init_adamw_state(self.optimizer)

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None) -> None:
        if self.scaler:
            if grads is None:
                outputs = [self.scaler.scale(o) for o in outputs]
            else:
                grads = [self.scaler.scale(g) for g in grads]
        torch.autograd.backward(outputs, grads)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm, applied, finite = self.apply()
        self.finish(finite)
        return norm, applied

    def apply(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip, check, update, clamp: (pre-clip norm, applied, finite). What ``train.compile=step`` compiles."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        if hasattr(norm, "full_tensor"):  # a sharded model's (FSDP) norm is a replicated DTensor
            norm = norm.full_tensor()
        finite = torch.isfinite(norm)
        if self.traced:
            masked_adamw_(self.optimizer, finite)
            applied = finite
        elif self.scaler:  # fp16: the scaler skips inf/NaN steps itself and adapts the scale (its normal dynamics,
            self.scaler.step(self.optimizer)  # not a non-finite step of train.nonfinite)
            self.scaler.update()
            applied = torch.ones_like(finite)
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).float()  # the kernel applies nothing when it is non-zero
            self.optimizer.step()
            applied = finite
        else:  # no device-side skip in this optimizer: the one host read
            if bool(finite):
                self.optimizer.step()
            applied = finite
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return norm.detach(), applied, finite

    def finish(self, finite: torch.Tensor) -> None:
        """Drop the gradients, advance the schedule, move the EMA (if the norm was finite)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update(finite)  # (not after a step the fp16 scaler skipped either)

    @property
    def lr(self) -> float:
        return scheduled_lr(self.scheduler, self.base_lr)

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group in self.optimizer.param_groups:  # (a checkpoint of either train.compile setting)
            group["lr"] = float(group["lr"])
        if self.traced:
            self._prepare_traced()
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save(self, path: Path, rank: int) -> None:
        """Rank 0 writes the full weights, the optimizer state and the EMA (the model is replicated)."""
        if rank == 0:  # (model.lora: without the frozen base weights)
            ckpt.save_tensors(path / "model.safetensors", lora.saved_weights(self.model, self.model.state_dict()))
            ckpt.save_torch(path / "engine.pt", self.state_dict())
            if self.ema:
                ema_lib.save_files(path, self.ema.shadow, self.ema.state())

    def load(self, path: Path, device: torch.device) -> None:
        weights = ckpt.load_tensors(path / "model.safetensors", device)
        if lora.is_adapted(self.model):
            lora.load_saved(self.model, weights, path)
        else:
            self.model.load_state_dict(weights)
        self.load_state_dict(ckpt.load_torch(path / "engine.pt"))
        if self.ema:
            self.ema.load_state(*ema_lib.load_files(path, device))


class Replicated:
    """The engine shape of a replicated model (one process, or DDP): the forward over ``module`` (the model or
    its DDP wrapper), the torch update over the model's own parameters, plain checkpoints from rank 0."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, cfg: RootConfig, env: DistEnv):
        self.model, self.device, self.rank = model, env.device, env.rank
        self.amp_dtype = autocast_dtype(cfg.train.precision, env.device)
        compile = cfg.train.compile
        self.forward = Forward(module, env.device, self.amp_dtype, cfg.train.channels_last, compile == "model")
        self.ema = ema_lib.build(cfg, lambda: {n: p.detach() for n, p in ema_lib.trainable(model).items()})
        self.update = TorchUpdate(model, cfg, env.device, self.amp_dtype, self.ema, traced=compile == "step")
        self.optimizer, self.scheduler = self.update.optimizer, self.update.scheduler

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        self.update.backward(outputs, grads)

    def no_sync(self):
        return contextlib.nullcontext()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.update.step()

    @property
    def lr(self) -> float:
        return self.update.lr

    def full_params(self):
        return contextlib.nullcontext()

    def ema_weights(self):
        return self.ema.swapped()

    def ema_copy(self, name: str) -> torch.Tensor | None:
        return self.ema.shadow.get(name) if self.ema else None

    def save(self, path: Path, background: bool = False) -> None:
        self.update.save(path, self.rank)  # synchronous (train.async_checkpoint is refused for this engine)

    def load(self, path: Path) -> None:
        self.update.load(path, self.device)
