"""Resuming with another world size or worker count keeps exactly-once for the rest of the epoch: every sample the
old run had not consumed is seen once by the new layout, none twice (the order differs, by design)."""

from __future__ import annotations

import collections
import itertools
import random

import pytest

from clipkit.data import dir_spec
from clipkit.data.loader import DataError, SampleDecoder, TrainLoader, resolve_shards
from clipkit.data.stream import StreamPlan, iter_slot


def _consume(plan: StreamPlan, worker: int, n: int) -> tuple[list[tuple[int, str]], tuple[int, int]]:
    """The first ``n`` samples of a slot from the start: (epoch, key) each, and the position after them."""
    out, pos = [], (0, 0)
    for e, t, sample in itertools.islice(iter_slot(plan, worker, 0, 0), n):
        out.append((e, sample["__key__"]))
        pos = (e, t + 1)
    return out, pos


@pytest.mark.parametrize("old,new", [((2, 2), (4, 2)), ((4, 2), (2, 2)), ((1, 2), (1, 3)), ((2, 1), (1, 2))])
def test_replanned_epochs_see_every_remaining_sample_once(small_demo, old, new):
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    total = sum(s.num_samples for s in shards)
    (w0, k0), (w1, k1) = old, new
    rng = random.Random(f"{old}{new}")
    consumed, positions = [], []
    span = total // (w0 * k0)
    for rank in range(w0):
        plan = StreamPlan(shards, weights, "epoch", 7, rank, w0, k0, 64)
        for w in range(k0):
            # some slots stop early in epoch 0, one has crossed into epoch 1
            n = span + 17 if (rank, w) == (0, 0) else rng.randrange(0, span)
            keys, pos = _consume(plan, w, n)
            consumed += keys
            positions.append(list(pos))
    first, last = min(p[0] for p in positions), max(p[0] for p in positions)
    assert (first, last) == (0, 1)
    seen = collections.Counter(consumed)
    for rank in range(w1):
        plan = StreamPlan(shards, weights, "epoch", 7, rank, w1, k1, 64)
        plan.elastic = {"positions": positions, "first_epoch": first, "last_epoch": last}
        for w in range(k1):
            for e, _, sample in iter_slot(plan, w, first, 0):
                if e > last:
                    break
                seen[(e, sample["__key__"])] += 1
    for epoch in (0, 1):
        keys = {k for (e, k) in seen if e == epoch}
        assert len(keys) == total, (epoch, len(keys))
        assert all(seen[(epoch, k)] == 1 for k in keys), collections.Counter(seen.values())


def test_loader_load_elastic_and_its_limits(small_demo):
    import open_clip

    def loader(world, rank, workers):
        shards, weights = resolve_shards(dir_spec(small_demo / "train"))
        return TrainLoader(
            shards,
            weights,
            SampleDecoder(("jpg",), "json:captions", 32, (0.9, 1.0), 0),
            open_clip.get_tokenizer("ViT-B-32"),
            mode="epoch",
            seed=0,
            rank=rank,
            world_size=world,
            num_workers=workers,
            batch_size=16,
            window=32,
        )

    olds = [loader(2, r, 0) for r in range(2)]
    first_keys = [k for ld in olds for _ in range(5) for k in next(ld)["keys"]]
    states = [ld.state_dict() for ld in olds]
    new = loader(1, 0, 2)
    note = new.load_elastic(states)
    assert "re-planned from 2 rank(s) x 1 worker(s) to 1 x 2" in note
    rest = []
    while not all(e >= 1 for e, _ in new.positions):
        batch = next(new)
        rest += [k for k, e in zip(batch["keys"], batch["epochs"], strict=True) if e == 0]
    new.close()
    assert sorted(first_keys + rest) == sorted(set(first_keys + rest)) and len(first_keys + rest) == 2000
    # the re-planned state resumes as itself with the same layout, but not into yet another layout mid-epoch
    again = loader(1, 0, 2)
    again.load_state_dict(new.state_dict())
    assert again.plan.elastic == new.plan.elastic
    half = loader(1, 0, 2)
    half.load_elastic(states)
    next(half)
    with pytest.raises(DataError, match="re-planned resume still inside epoch 0"):
        loader(1, 0, 3).load_elastic([half.state_dict()])
    half.close()
