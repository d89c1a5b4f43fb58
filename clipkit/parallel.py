"""Engines: how the model is wrapped, how backward/step run, and what they checkpoint.

The training loop talks only to this interface; data-parallel strategies are siblings behind it, so the loop
has no per-strategy branches:

    forward(images, text) -> outputs        backward(outputs, grads)    no_sync()  (accumulation)
    check_finite(loss)                      step() -> grad norm         lr
    save(dir) / load(dir)  (collective)     full_params()  (a context in which ``model`` holds every weight)

``LocalEngine`` (one process) and ``DDPEngine`` (torch DDP) live here; ``clipkit.zero.DeepSpeedEngine``
(ZeRO-1/2/3) is the third sibling.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from clipkit import checkpoint as ckpt
from clipkit.config import RootConfig
from clipkit.distributed import DistEnv, flags_of_all_ranks
from clipkit.optim import build_optimizer, build_scheduler

log = logging.getLogger("clipkit")
MAX_LOGIT_SCALE = math.log(100)


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient norm; raised on every rank of the step, before any update."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` (None = full fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LocalEngine:
    """Single process: plain model, AdamW, schedule, optional fp16 loss scaling."""

    def __init__(self, model: torch.nn.Module, cfg: RootConfig, device: torch.device, rank: int = 0):
        self.rank = rank
        self.channels_last = cfg.train.channels_last
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the unwrapped open_clip model (checkpoints, eval, export use this)
        self.module = self.wrap(model, device)  # what forward calls
        # torch.compile is lazy: the first forward compiles; if that fails, training goes on in eager mode.
        self._compiled = torch.compile(self.module) if cfg.train.compile else None
        self._compile_checked = False
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.grad_clip_norm = cfg.optim.grad_clip_norm
        self.device = device
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            if self._compiled is None:
                return self.module(images, text)
            if self._compile_checked:
                return self._compiled(images, text)
            try:
                out = self._compiled(images, text)
                self._compile_checked = True
                return out
            except Exception as err:  # dynamo / inductor failures surface at the first call
                log.warning("torch.compile failed (%s: %s); training in eager mode", type(err).__name__, err)
                self._compiled = None
                return self.module(images, text)

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        """Backpropagates a scalar loss (``grads=None``) or given gradients of several outputs (fp16-scaled)."""
        if self.scaler:
            if grads is None:
                outputs = [self.scaler.scale(o) for o in outputs]
            else:
                grads = [self.scaler.scale(g) for g in grads]
        torch.autograd.backward(outputs, grads)

    def no_sync(self):
        """Context in which backward accumulates locally without cross-rank gradient synchronisation."""
        return contextlib.nullcontext()

    def step_number(self) -> int:
        """The 1-based number of the update being computed."""
        return self.scheduler.last_epoch + 1

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raises on every rank, before backward, when any rank's loss is NaN/inf (naming the step and ranks)."""
        finite = flags_of_all_ranks(bool(torch.isfinite(loss.detach()).all()), self.device)
        if not all(finite):
            bad = ", ".join(str(r) for r, ok in enumerate(finite) if not ok)
            raise NonFiniteError(f"non-finite loss at step {self.step_number()} on rank {bad}; no update was applied")

    def skip_step(self) -> None:
        """Drops the gradients of a step that will not be applied (parameters and optimizer untouched)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Clips, updates, advances the schedule, clamps the temperature; returns the pre-clip grad norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip_norm if self.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is None and not torch.isfinite(grad_norm):  # (fp16: the scaler skips such steps itself)
            # Gradients were averaged over the ranks, so every rank sees the same norm and raises here.
            raise NonFiniteError(
                f"non-finite gradient (norm {float(grad_norm)}) at step {self.step_number()} on rank {self.rank} "
                "(and every other: gradients are averaged); no update was applied"
            )
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_params(self):
        """Context in which ``self.model`` holds all of its weights (eval, export); trivial when unsharded."""
        return contextlib.nullcontext()

    def save(self, path: Path) -> None:
        """Writes the model and the engine state into checkpoint dir ``path``; called on every rank."""
        if self.rank == 0:
            ckpt.save_tensors(path / "model.safetensors", self.model.state_dict())
            ckpt.save_torch(path / "engine.pt", self.state_dict())

    def load(self, path: Path) -> None:
        """Restores what ``save`` wrote (the checkpoint was verified before)."""
        self.model.load_state_dict(ckpt.load_tensors(path / "model.safetensors", self.device))
        self.load_state_dict(ckpt.load_torch(path / "engine.pt"))

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class DDPEngine(LocalEngine):
    """torch DistributedDataParallel: gradients averaged over ranks during backward."""

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self):
        return self.module.no_sync()


def build_engine(model: torch.nn.Module, cfg: RootConfig, env: DistEnv) -> LocalEngine:
    """The engine ``parallel.engine`` names (DeepSpeed is imported only when asked for)."""
    if cfg.parallel.engine.startswith("zero"):
        from clipkit.zero import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, env)
    return (DDPEngine if env.world_size > 1 else LocalEngine)(model, cfg, env.device, env.rank)
