"""TCP ports for the tests' rendezvous (torchrun's --master_port, spawned ranks, loopback servers).

The tests run on several pytest-xdist workers at once. A port the kernel hands out for ``bind(("", 0))`` is free
only at that moment: two workers asking at about the same time were handed the same one and the second job
failed with EADDRINUSE. Each worker draws from a range of its own, below the kernel's ephemeral range (which
starts at 32768), so no other worker and no ``bind(0)`` can be handed the same port; SLURM-style jobs derive theirs
from the job id (``slurm_job_id``), also per worker."""

from __future__ import annotations

import os
import random
import socket

SPAN = 2000  # ports per worker: gw0 20000-21999, gw1 22000-23999, ... (up to 4 workers below SLURM's 29500)


def worker_index() -> int:
    """This pytest-xdist worker's number (0 without xdist)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this worker's range that nothing holds now (a bind succeeds, TIME_WAIT included)."""
    low = 20000 + SPAN * (worker_index() % 4)
    for port in random.sample(range(low, low + SPAN), SPAN):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + SPAN - 1}")


def slurm_job_id() -> str:
    """A SLURM job id whose rendezvous port (clipkit: 29500 + id % 1000) is this worker's: distinct workers'
    jobs never share one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    offset = random.randrange(0, 1000 // workers) * workers + worker_index() % workers
    return str(random.randrange(1, 10) * 1000 + offset)
