"""Engines: how the model is wrapped, how backward and the update run, and what they checkpoint.

This module is light (no torch at import): the config validation imports ``ParallelConfig`` from here.

The training step (``clipkit.step.train_step``) talks only to the ``Engine`` protocol; the data-parallel
strategies are siblings behind it (``local.py``, ``ddp.py``, ``zero.py``), each composed of the shared parts in
``parts.py``; none imports another. ``build_engine`` picks one from ``parallel.engine`` and the world size.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from clipkit.errors import RESUMABLE, Choice, NonFiniteError, positive

if TYPE_CHECKING:
    import torch

    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.ema import EMA

__all__ = ["Engine", "EngineName", "NonFiniteError", "ParallelConfig", "build_engine"]


class EngineName(Choice):
    ddp = "ddp"  # torch DDP (a single process needs no wrapper)
    zero1 = "zero1"  # DeepSpeed ZeRO: optimizer state partitioned,
    zero2 = "zero2"  # ... and gradients,
    zero3 = "zero3"  # ... and parameters
    fsdp = "fsdp"  # torch FSDP2: parameters, gradients and optimizer state sharded per transformer block


@dataclass
class ParallelConfig:
    # ddp (replicated; one process is ddp too), zero1/2/3 (DeepSpeed), fsdp (torch FSDP2); presets parallel=NAME.
    engine: EngineName = EngineName.ddp
    # Collective timeout: a rank that dies or stalls makes the others fail after this long instead of hanging.
    timeout_s: int = field(default=600, metadata=RESUMABLE)
    # Ranks agree on a received SIGTERM/SIGUSR1 (a collective and a host read) every N steps; a stop then comes
    # within N steps. A single process checks every step (it costs nothing there).
    signal_check_every: int = field(default=10, metadata=RESUMABLE)
    # DeepSpeed (the JSON is generated from these and from train/optim; there is no second file) and FSDP: keep
    # optimizer state (zero3: and parameters; fsdp: parameters, gradients and optimizer state) in CPU memory.
    offload_optimizer: bool = False
    # (zero3: parameters in CPU memory too)
    offload_params: bool = False
    # FSDP only: free each block's gathered parameters after its forward (all-gather again in backward); false
    # keeps them, trading memory for one all-gather less per block.
    reshard_after_forward: bool = True
    # Overlap gradient reduction with backward (DeepSpeed supports it with clipkit's accumulation on zero2 only).
    overlap_comm: bool = True
    # Gradient reduce / parameter all-gather bucket size, in millions of elements.
    bucket_size_m: int = 200
    # On SIGUSR1 (SLURM's --signal) after the checkpoint: ``scontrol requeue $SLURM_JOB_ID`` from rank 0.
    requeue: bool = field(default=True, metadata=RESUMABLE)

    @property
    def is_deepspeed(self) -> bool:
        return self.engine in (EngineName.zero1, EngineName.zero2, EngineName.zero3)

    def validate(self, prefix: str = "parallel") -> None:
        """Own fields; what the engine supports of the training config is checked in ``clipkit.config``."""
        from clipkit.errors import ConfigError

        positive(prefix, self, "timeout_s", "signal_check_every", "bucket_size_m")
        if self.engine == EngineName.ddp:
            for key in ("offload_optimizer", "offload_params"):
                if getattr(self, key):
                    raise ConfigError(f"{prefix}.{key}", True, "offload needs parallel=zero1|2|3 or fsdp")
        elif self.offload_params and self.engine != EngineName.zero3:
            raise ConfigError(
                f"{prefix}.offload_params", True, f"parameter offload needs parallel=zero3, not {self.engine}"
            )


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

    def save(self, path: Path, background: bool = False) -> Future | None:
        """Writes model and engine state into checkpoint dir ``path`` (collective: every rank calls it). With
        ``background`` (``train.async_checkpoint``, FSDP only) it may return a future that completes when the
        files are written; the state was copied before it returns."""

    def load(self, path: Path) -> None:
        """Restores what ``save`` wrote (the checkpoint was verified before)."""


def build_engine(model: torch.nn.Module, cfg: RootConfig, env: DistEnv) -> Engine:
    """The engine ``parallel.engine`` names for this world size (DeepSpeed is imported only when asked for)."""
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
