"""Preemption: SIGTERM / SIGUSR1 on any rank -> every rank checkpoints at the next agreement, exits 0.

The handler only records the signal (nothing unsafe runs inside it), so a signal during a step, an eval or a
checkpoint save lets that finish. Every ``parallel.signal_check_every`` steps (every step in a single process)
the ranks agree with one tiny all-reduce (MAX): one rank's signal stops them all at the same step, so the
checkpoint is complete and consistent. Loader workers
ignore these signals (a cluster signals every process of the job) and are shut down by their parent.

Under SLURM, ``#SBATCH --signal=B:USR1@120`` (or ``srun --signal=USR1@120``) warns before the time limit;
on SIGUSR1 rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` after the checkpoint (``parallel.requeue``), and
the requeued job resumes from it by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

from clipkit.distributed import rank_and_world
from clipkit.errors import Preempted

log = logging.getLogger("clipkit")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# While the main thread waits for a batch (see data_wait), a preemption signal cannot wait for a step boundary
# that may never come: it gets GRACE_S seconds for the batch to arrive, then ends the run.
GRACE_S = 5.0
_state = {"waiting": False, "pending": 0}


class DataStall(BaseException):
    """No batch arrived within the stall timeout (raised by SIGALRM inside ``data_wait``)."""


def _raise_stall(signum, frame) -> None:
    raise DataStall()


def _raise_preempted(signum, frame) -> None:
    raise Preempted(_state["pending"])


def _arm_grace() -> None:
    signal.signal(signal.SIGALRM, _raise_preempted)
    signal.setitimer(signal.ITIMER_REAL, GRACE_S)


@contextlib.contextmanager
def data_wait(stall_timeout_s: float = 0.0):
    """The main thread waits for a batch. With ``stall_timeout_s`` > 0, no batch within that time raises
    ``DataStall``; a preemption signal received before or during the wait raises ``Preempted`` if no batch
    arrives within ``GRACE_S`` (a real-time timer: a wait blocked in a queue or a socket is interrupted too).
    Off the main thread it only waits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGALRM)
    if _state["pending"]:
        _arm_grace()
    elif stall_timeout_s > 0:
        signal.signal(signal.SIGALRM, _raise_stall)
        signal.setitimer(signal.ITIMER_REAL, stall_timeout_s)
    _state["waiting"] = True
    try:
        yield
    finally:
        _state["waiting"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def deferred(signals=(signal.SIGINT, *SIGNALS)):
    """Signals that arrive inside are only recorded, then raised again on leaving (in the main thread: Python
    runs every handler there, whichever thread the OS delivered the signal to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(got):
            signal.raise_signal(signum)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """In loader workers: preemption signals are the training process's to handle."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """Records SIGTERM / SIGUSR1; ``agreed()`` is the signal any rank received (collective), or 0.

    Until ``started()`` (the run is still building: no step to finish, nothing to checkpoint) a signal raises
    ``Preempted`` at once; from then on it is agreed at the next step boundary, or ends a wait for data that
    outlasts ``GRACE_S``."""

    def __init__(self):
        self.received = 0
        self.immediate = True
        self._previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def started(self) -> None:
        self.immediate = False

    def _record(self, signum, frame) -> None:
        self.received = _state["pending"] = signum
        if self.immediate:
            raise Preempted(signum)
        if _state["waiting"]:
            _arm_grace()

    def agreed(self, device: torch.device) -> int:
        if rank_and_world()[1] == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        _state["pending"] = 0
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
