"""Engines: how the model is wrapped, how backward and the update run, and what they checkpoint.

The training step (``clipkit.step.train_step``) talks only to the ``Engine`` protocol; the data-parallel
strategies are siblings behind it (``local.py``, ``ddp.py``, ``zero.py``), each composed of the shared parts in
``parts.py``; none imports another. ``build_engine`` picks one from ``parallel.engine`` and the world size.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from clipkit.engine.config import EngineName, ParallelConfig
from clipkit.errors import NonFiniteError

if TYPE_CHECKING:  # (annotations only: the root config imports engine/config.py, which imports this package)
    import torch

    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.ema import EMA

__all__ = ["Engine", "EngineName", "NonFiniteError", "ParallelConfig", "build_engine"]


class Engine(Protocol):
    model: torch.nn.Module  # the unwrapped open_clip model (its state_dict has open_clip's names and shapes)
    amp_dtype: torch.dtype | None
    ema: EMA | None  # train.ema_decay > 0: the moving average, moved by ``step`` after every applied update

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        """The model's outputs (``image_features``, ``text_features``, 0-d ``logit_scale`` [, ``logit_bias``])."""

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        """Backpropagates a scalar loss (``grads=None``) or the given gradients of several outputs."""

    def no_sync(self) -> AbstractContextManager:
        """A context in which backward accumulates locally, without synchronising gradients across ranks."""

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips and applies the accumulated gradients, unless their global norm is not finite (then nothing is
        applied: parameters, optimizer state and EMA stay as they were, and the gradients are dropped), and
        advances the schedule either way. Returns (pre-clip norm, applied), both on the device: the decision is
        taken there and nothing is read on the host (the loop reads ``applied`` with the loss when it logs). The
        norm is the same on every rank (gradients are reduced before it is computed), so is the decision."""

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""

    def full_params(self) -> AbstractContextManager:
        """A context in which ``model`` holds all of its weights (eval, export); trivial when unsharded."""

    def ema_weights(self) -> AbstractContextManager:
        """``full_params`` with the EMA weights in place of the trainable parameters (only when ``ema``)."""

    def ema_copy(self, name: str) -> torch.Tensor | None:
        """The EMA's copy of parameter ``name`` laid out like the parameter (a DTensor when it is one), sharing
        the EMA's storage, for rewriting both alike (``train.stages``); None if it is not averaged."""

    def save(self, path: Path, background: bool = False) -> Future | None:
        """Writes model and engine state into checkpoint dir ``path`` (collective: every rank calls it). With
        ``background`` (``train.async_checkpoint``, FSDP only) it may return a future that completes when the
        files are written; the state was copied before it returns."""

    def load(self, path: Path) -> None:
        """Restores what ``save`` wrote (the checkpoint was verified before)."""


def build_engine(model: torch.nn.Module, cfg: RootConfig, env: DistEnv) -> Engine:
    """The engine ``parallel.engine`` names for this world size. Each engine module is imported when chosen: ZeRO
    imports DeepSpeed (optional, seconds to import), FSDP the DTensor stack, and the engines import this package."""
    if cfg.parallel.is_deepspeed:
        from clipkit.engine.zero import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, env)
    if cfg.parallel.engine == EngineName.fsdp:
        from clipkit.engine.fsdp import FSDPEngine

        return FSDPEngine(model, cfg, env)
    if env.world_size > 1:
        from clipkit.engine.ddp import DDPEngine

        return DDPEngine(model, cfg, env)
    from clipkit.engine.local import LocalEngine

    return LocalEngine(model, cfg, env)
