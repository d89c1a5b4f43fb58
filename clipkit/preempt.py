"""Preemption: SIGTERM / SIGUSR1 on any rank -> every rank checkpoints at the next step boundary, exits 0.

The handler only records the signal (nothing unsafe runs inside it), so a signal during a step, an eval or a
checkpoint save lets that finish. At each step boundary the ranks agree with one tiny all-reduce (MAX): one
rank's signal stops them all at the same step, so the checkpoint is complete and consistent. Loader workers
ignore these signals (a cluster signals every process of the job) and are shut down by their parent.

Under SLURM, ``#SBATCH --signal=B:USR1@120`` (or ``srun --signal=USR1@120``) warns before the time limit;
on SIGUSR1 rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` after the checkpoint (``parallel.requeue``), and
the requeued job resumes from it by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import torch
import torch.distributed as dist

from clipkit.distributed import rank_and_world

log = logging.getLogger("clipkit")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave preemption to the training process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """Records SIGTERM / SIGUSR1; ``agreed()`` is the signal any rank received (collective), or 0."""

    def __init__(self):
        self.received = 0
        self._previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def _record(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> int:
        if rank_and_world()[1] == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` of this SLURM job; False (logged) when not under SLURM or it fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return False
    log.info("requeued SLURM job %s", job)
    return True
