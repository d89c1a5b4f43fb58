"""Stopping loader workers on an error or an interrupt (``stop_workers(kill=True)``) never hangs, whatever a worker
was doing when it was killed."""

from __future__ import annotations

import sys
import threading
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

from clipkit.data import worker_context
from clipkit.data.loader import stop_workers


class HoldsTheDoneEventsLock(IterableDataset):
    """In its worker, takes the lock of torch's shared 'workers done' event, as a worker does for an instant each
    time it asks ``done_event.is_set()``, then yields: the worker is killed holding it."""

    def __iter__(self):
        frame = sys._getframe()
        while frame.f_code.co_name != "_worker_loop":
            frame = frame.f_back
        frame.f_locals["done_event"]._cond.acquire()
        yield from (torch.tensor(i) for i in range(10**6))


def test_a_worker_killed_holding_the_done_events_lock_does_not_hang_the_stop():
    """A DataError or a Ctrl-C SIGKILLs the workers at once (a worker stuck on a shard never sees the done event).
    One killed inside ``done_event.is_set()`` left the event's lock held, and torch's own shutdown, which sets
    the event, then waited for it forever: a run of `clipkit train` with a wrong caption key hung that way."""
    loader = DataLoader(
        HoldsTheDoneEventsLock(), batch_size=None, num_workers=1, multiprocessing_context=worker_context()
    )
    it = iter(loader)
    assert int(next(it)) == 0  # (the worker holds the lock now)
    stopper = threading.Thread(target=stop_workers, args=(it,), kwargs={"kill": True}, daemon=True)
    start = time.monotonic()
    stopper.start()
    stopper.join(timeout=60)
    assert not stopper.is_alive(), "stop_workers(kill=True) hung on the lock the killed worker held"
    assert time.monotonic() - start < 30
    assert not any(w.is_alive() for w in it._workers)
