"""The deterministic, position-addressable sample stream behind the training loader.

Every (rank, worker) pair is a *slot*. For each epoch of a slot we compute a plan: which shard ranges it
reads (``segments``) and in which order it emits the span's samples (``order``). A slot's position is
``(epoch, t)``: the next sample it emits is ``order[t]`` of that epoch's plan. Everything is a pure function of
(seed, epoch, shards, world size, workers), so a position is a complete checkpoint of a slot.

epoch mode      the shard list is permuted per epoch; the concatenated sample space is cut into equal
                contiguous spans, one per slot: every sample exactly once per epoch, every slot busy even
                with fewer shards than slots (neighbouring slots read disjoint ranges of one shard).
resampled mode  each slot draws whole shards with replacement, weighted per source, forever.

Within a span, the order is a seeded *windowed shuffle*: sample i is emitted at rank of ``i + U_i * window``
(U_i uniform in [0, 1)); every sample moves at most ``window`` places, so the reader holds at most about
``window`` samples. Because the order is computed on indices, resuming at ``t`` skips the shards before the
earliest sample still due without opening them, and reads (never decodes) the rest of that shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

# Error kinds counted (never raised) while streaming.
MISSING = "missing"  # announced by sizes.json but not delivered (truncated / unreadable tar)


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    source: int = 0


@dataclass(frozen=True)
class Segment:
    url: str
    start: int  # first sample index inside the shard
    stop: int  # one past the last


class StreamPlan:
    """Plans of every slot of one rank; picklable, shipped to DataLoader workers."""

    def __init__(
        self,
        shards: list[Shard],
        source_weights: list[float],
        mode: str,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        window: int,
    ):
        if not shards:
            raise ValueError("no shards")
        self.shards, self.mode, self.seed = shards, mode, seed
        self.rank, self.world_size, self.num_workers, self.window = rank, world_size, max(1, num_workers), window
        self.num_slots = self.world_size * self.num_workers
        self.total = sum(s.num_samples for s in shards)
        per_shard = np.array([source_weights[s.source] / sum(x.source == s.source for x in shards) for s in shards])
        self.shard_probs = per_shard / per_shard.sum()
        # Resampled "epochs" are chunks of this many shards per slot (only sets the reshuffle granularity).
        self.resampled_shards = max(1, math.ceil(len(shards) / self.num_slots))

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *words])

    def segments(self, worker: int, epoch: int) -> list[Segment]:
        slot = self.rank * self.num_workers + worker
        if self.mode == "resampled":
            picks = self._rng(1, epoch, slot).choice(len(self.shards), self.resampled_shards, p=self.shard_probs)
            return [Segment(self.shards[i].url, 0, self.shards[i].num_samples) for i in picks]
        perm = self._rng(0, epoch).permutation(len(self.shards))
        lo, hi = slot * self.total // self.num_slots, (slot + 1) * self.total // self.num_slots
        segments, offset = [], 0
        for i in perm:
            shard = self.shards[i]
            a, b = max(lo, offset), min(hi, offset + shard.num_samples)
            if a < b:
                segments.append(Segment(shard.url, a - offset, b - offset))
            offset += shard.num_samples
        return segments

    def order(self, worker: int, epoch: int, n: int) -> np.ndarray:
        if self.window <= 1:
            return np.arange(n)
        slot = self.rank * self.num_workers + worker
        keys = np.arange(n) + self._rng(2, epoch, slot).random(n) * self.window
        return np.argsort(keys, kind="stable")


def iter_shard(url: str, handler) -> Iterator[dict]:
    """Samples of one shard in tar order, via webdataset's tar reader and key grouping."""
    yield from wds.tariterators.tarfile_samples([{"url": url}], handler=handler)


def read_span(segments: list[Segment], order: np.ndarray, start: int, on_error) -> Iterator[tuple[int, dict]]:
    """Yields ``(t, sample)`` for t >= start in ``order``; where the data never arrived (truncated or unreadable
    shard) ``sample`` is ``{"__missing__": True, "__url__": url}``."""
    n = len(order)
    if start >= n:
        return
    due = np.zeros(n, dtype=bool)
    due[order[start:]] = True
    first_due = int(order[start:].min())
    seg_offsets = np.cumsum([0] + [s.stop - s.start for s in segments])

    def reader() -> Iterator[tuple[int, dict]]:
        for k in range(int(np.searchsorted(seg_offsets, first_due, side="right")) - 1, len(segments)):
            seg, base = segments[k], int(seg_offsets[k])
            try:
                for j, sample in enumerate(iter_shard(seg.url, on_error)):
                    if j >= seg.stop:
                        break
                    if j >= seg.start and due[base + j - seg.start]:
                        yield base + j - seg.start, sample
            except Exception as exn:  # a broken shard ends early; its missing samples are counted on emission
                on_error(exn)

    held: dict[int, dict] = {}
    source, read_pos = reader(), first_due
    for t in range(start, n):
        idx = int(order[t])
        while idx >= read_pos:
            nxt = next(source, None)
            if nxt is None:
                read_pos = n
                break
            read_pos = nxt[0] + 1
            held[nxt[0]] = nxt[1]
        sample = held.pop(idx, None)
        if sample is None:
            k = int(np.searchsorted(seg_offsets, idx, side="right")) - 1
            sample = {"__missing__": True, "__url__": segments[k].url}
        yield t, sample


def iter_slot(plan: StreamPlan, worker: int, epoch: int, t: int, on_error) -> Iterator[tuple[int, int, dict]]:
    """The slot's endless stream from position (epoch, t): yields ``(epoch, t, sample)``."""
    while True:
        segments = plan.segments(worker, epoch)
        order = plan.order(worker, epoch, sum(s.stop - s.start for s in segments))
        for pos, sample in read_span(segments, order, t, on_error):
            yield epoch, pos, sample
        epoch, t = epoch + 1, 0
