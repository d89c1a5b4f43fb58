"""A run directory belongs to one run at a time: a lock held while ``clipkit train`` runs there, and what
``train.resume`` may do with checkpoints it finds.

The lock is an ``flock`` on ``RUN_DIR/.clipkit.lock``, taken by rank 0: the kernel releases it when the process
ends, however it ends (kill -9 included), so it never goes stale. A second run on the same directory stops at
once, naming the one that holds it (pid, host, start time). (On a network file system that does not support
``flock`` the lock is skipped with a warning.)
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from clipkit.errors import UserError

log = logging.getLogger("clipkit")
LOCK = ".clipkit.lock"
_HELD: list = []  # the open lock files of this process (the lock lives as long as its file object)


class RunDirError(UserError, RuntimeError):
    pass


def lock(run_dir: Path) -> None:
    """Takes the run directory for this process, or raises ``RunDirError`` naming who has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            log.warning("cannot lock %s (%s): two runs on it would not be stopped", run_dir, err)
            f.close()
            return
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(
            f"run dir {run_dir} is in use by another clipkit train ({holder}); wait for it, or use another "
            "hydra.run.dir"
        ) from None
    f.seek(0)
    f.truncate()
    when = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": when}))
    f.flush()
    _HELD.append(f)


def checkpoint_steps(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step_")) if folder.is_dir() else []


def refuse_or_move_aside(run_dir: Path, resume: str) -> Path | None:
    """``train.resume=never`` on a directory with checkpoints is refused (its checkpoints would outlive the new
    run's, and ``keep_last`` would delete the new ones); ``restart`` moves the old run's files aside whole, into
    ``RUN_DIR.old-TIMESTAMP``, and returns that folder."""
    steps = checkpoint_steps(run_dir)
    if resume == "never" and steps:
        raise RunDirError(
            f"run dir {run_dir} holds checkpoints of an earlier run (newest {steps[-1]}) and train.resume=never: use "
            "a new hydra.run.dir, or train.resume=restart to move that run aside and start over (train.resume=auto "
            "continues it)"
        )
    if resume != "restart" or not any(p.name != LOCK for p in run_dir.iterdir()):
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    aside.mkdir()
    for p in run_dir.iterdir():
        if p.name != LOCK:
            p.rename(aside / p.name)
    return aside
