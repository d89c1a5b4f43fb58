"""The distributed tests' ranks: ``start_ranks(fn, args, nprocs)`` runs ``fn(rank, *args)`` in ``nprocs`` processes
of their own, as ``torch.multiprocessing.start_processes(..., start_method="spawn")`` does, but forked from the
tests' fork server (``tests/prefork.py``), which has torch and open_clip imported: ~4 s less per rank on 2 cores.

``python -m tests.distributed.ranks MODULE:FUNCTION RANK ARGS_JSON`` is what each rank runs. When a rank fails,
the others are killed (a rank left waiting in a collective for a peer that is gone would wait for gloo's timeout)
and the failure is raised with that rank's stderr. ``CLIPKIT_TEST_PREFORK=0`` spawns fresh interpreters instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import sys
import time
from collections.abc import Callable, Sequence

from tests import prefork

MODULE = "tests.distributed.ranks"


def start_ranks(fn: Callable, args: Sequence, nprocs: int, timeout: float = 900) -> None:
    """``fn(rank, *args)`` for rank 0 .. nprocs-1, each a process of its own; returns once all have exited 0."""
    server = prefork.client()
    if server is None:
        import torch.multiprocessing as mp

        mp.start_processes(fn, args=tuple(args), nprocs=nprocs, start_method="spawn")
        return
    target, payload = f"{fn.__module__}:{fn.__qualname__}", json.dumps(list(args))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ranks = [server.start([target, str(rank), payload], env, module=MODULE) for rank in range(nprocs)]
    deadline, pending = time.monotonic() + timeout, dict(enumerate(ranks))
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{target}: ranks {sorted(pending)} still running after {timeout} s")
            ready, _, _ = select.select([c.conn for c in pending.values()], [], [], min(left, 1.0))
            for rank, command in list(pending.items()):
                if command.conn in ready:
                    del pending[rank]
                    done = command.wait(None)
                    if done.returncode != 0:
                        raise AssertionError(f"{target}: rank {rank} exited {done.returncode}:\n{done.stderr[-4000:]}")
    finally:
        for command in pending.values():
            command.kill()
        for command in pending.values():
            with contextlib.suppress(Exception):  # (killed: its status only; the error to report is the first)
                command.wait(60)


def main(argv: list[str]) -> None:
    target, rank, payload = argv
    module, name = target.split(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    fn(int(rank), *json.loads(payload))


if __name__ == "__main__":
    main(sys.argv[1:])
