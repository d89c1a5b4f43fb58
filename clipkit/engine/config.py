"""The engines' config (``parallel.*``): which engine, offload, buckets, timeouts and signal checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipkit.errors import RESUMABLE, Choice, ConfigError, positive


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
        positive(prefix, self, "timeout_s", "signal_check_every", "bucket_size_m")
        if self.engine == EngineName.ddp:
            for key in ("offload_optimizer", "offload_params"):
                if getattr(self, key):
                    raise ConfigError(f"{prefix}.{key}", True, "offload needs parallel=zero1|2|3 or fsdp")
        elif self.offload_params and self.engine != EngineName.zero3:
            raise ConfigError(
                f"{prefix}.offload_params", True, f"parameter offload needs parallel=zero3, not {self.engine}"
            )
