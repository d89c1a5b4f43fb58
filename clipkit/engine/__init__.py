"""Engines: how the model is wrapped, how backward and the update run, and what they checkpoint.

This module is light (no torch at import): the config validation imports ``ParallelConfig`` from here.

The training step (``clipkit.step.train_step``) talks only to the ``Engine`` protocol; the data-parallel
strategies are siblings behind it (``local.py``, ``ddp.py``, ``zero.py``), each composed of the shared parts in
``parts.py``; none imports another. ``build_engine`` picks one from ``parallel.engine`` and the world size.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from clipkit.errors import Choice, NonFiniteError, positive

if TYPE_CHECKING:
    import torch

    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv

__all__ = ["Engine", "EngineName", "NonFiniteError", "ParallelConfig", "build_engine"]


class EngineName(Choice):
    ddp = "ddp"  # torch DDP (a single process needs no wrapper)
    zero1 = "zero1"  # DeepSpeed ZeRO: optimizer state partitioned,
    zero2 = "zero2"  # ... and gradients,
    zero3 = "zero3"  # ... and parameters


@dataclass
class ParallelConfig:
    engine: EngineName = EngineName.ddp
    # Collective timeout: a rank that dies or stalls makes the others fail after this long instead of hanging.
    timeout_s: int = 600
    # Ranks agree on a received SIGTERM/SIGUSR1 (a collective and a host read) every N steps; a stop then comes
    # within N steps. A single process checks every step (it costs nothing there).
    signal_check_every: int = 10
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

    @property
    def is_deepspeed(self) -> bool:
        return self.engine != EngineName.ddp

    def validate(self, prefix: str = "parallel") -> None:
        """Own fields; what the engine supports of the training config is checked in ``clipkit.config``."""
        from clipkit.errors import ConfigError

        positive(prefix, self, "timeout_s", "signal_check_every", "bucket_size_m")
        if not self.is_deepspeed:
            for key in ("offload_optimizer", "offload_params"):
                if getattr(self, key):
                    raise ConfigError(f"{prefix}.{key}", True, "offload needs a DeepSpeed engine (parallel=zero1|2|3)")
        elif self.offload_params and self.engine != EngineName.zero3:
            raise ConfigError(
                f"{prefix}.offload_params", True, f"parameter offload needs parallel=zero3, not {self.engine}"
            )


class Engine(Protocol):
    model: torch.nn.Module  # the unwrapped open_clip model (its state_dict has open_clip's names and shapes)
    amp_dtype: torch.dtype | None

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        """The model's outputs (``image_features``, ``text_features``, 0-d ``logit_scale`` [, ``logit_bias``])."""

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        """Backpropagates a scalar loss (``grads=None``) or the given gradients of several outputs."""

    def no_sync(self) -> AbstractContextManager:
        """A context in which backward accumulates locally, without synchronising gradients across ranks."""

    def step(self) -> tuple[torch.Tensor, bool]:
        """Clips and applies the accumulated gradients and advances the schedule, unless their global norm is not
        finite; then nothing is applied and the gradients are dropped. Returns (pre-clip norm on the device,
        applied). The one host read of a training step is the finiteness of that norm; it is the same on every
        rank (gradients are reduced before it is computed), so every rank takes the same branch."""

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""

    def full_params(self) -> AbstractContextManager:
        """A context in which ``model`` holds all of its weights (eval, export); trivial when unsharded."""

    def save(self, path: Path) -> None:
        """Writes model and engine state into checkpoint dir ``path`` (collective: every rank calls it)."""

    def load(self, path: Path) -> None:
        """Restores what ``save`` wrote (the checkpoint was verified before)."""


def build_engine(model: torch.nn.Module, cfg: RootConfig, env: DistEnv) -> Engine:
    """The engine ``parallel.engine`` names for this world size (DeepSpeed is imported only when asked for)."""
    if cfg.parallel.is_deepspeed:
        from clipkit.engine.zero import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, env)
    if env.world_size > 1:
        from clipkit.engine.ddp import DDPEngine

        return DDPEngine(model, cfg, env)
    from clipkit.engine.local import LocalEngine

    return LocalEngine(model, cfg, env)
