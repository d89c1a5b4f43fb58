"""The training stream by the exact keys it yields: exactly once per epoch, deterministic, exact resume."""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import torch

from clipkit.data import dir_spec
from clipkit.data.loader import DataError, SampleDecoder, TrainLoader, resolve_shards
from clipkit.data.stream import StreamPlan, iter_stream, read_span


def _plan_keys(shards, weights, streams, window=50, epoch=0, mode="epoch"):
    keys = collections.Counter()
    plan = StreamPlan(shards, weights, mode, 0, streams, window)
    for c in range(streams):
        segs = plan.segments(c, epoch)
        for _, sample in read_span(segs, plan.order(c, epoch, sum(s.stop - s.start for s in segs)), 0):
            keys[sample["__key__"]] += 1
    return keys


@pytest.mark.parametrize("streams", [1, 3, 12, 64])
def test_every_sample_exactly_once_per_epoch(small_demo, streams):
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    assert sorted(s.num_samples for s in shards) == [200, 600, 600, 600]  # uneven shards
    keys = _plan_keys(shards, weights, streams)
    assert len(keys) == 2000 and set(keys.values()) == {1}


def test_fewer_shards_than_streams(small_demo):
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    keys = _plan_keys(shards[:2], weights, streams=12)  # 2 shards, 12 streams
    assert len(keys) == sum(s.num_samples for s in shards[:2]) and set(keys.values()) == {1}


def test_order_is_seeded_and_changes_per_epoch(small_demo):
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    plan = StreamPlan(shards, weights, "epoch", 0, 1, 100)

    def first(epoch, plan=plan):
        return [s["__key__"] for (_, _, s) in itertools.islice(iter_stream(plan, 0, epoch, 0), 300)]

    assert first(0) == first(0)
    assert first(0) != first(1)
    other = StreamPlan(shards, weights, "epoch", 1, 1, 100)
    assert first(0) != [s["__key__"] for (_, _, s) in itertools.islice(iter_stream(other, 0, 0, 0), 300)]


def test_resume_at_random_points_equals_uninterrupted(small_demo):
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    plan = StreamPlan(shards, weights, "epoch", 3, 6, 384)
    full = [(e, t, s["__key__"]) for (e, t, s) in itertools.islice(iter_stream(plan, 5, 0, 0), 1000)]
    points = random.Random(0).sample(range(1, 1000), 10)
    for start in points + [333, 334, 335]:  # this stream (5 of 6) spans 334 samples: its epoch ends at 334
        e, t, _ = full[start]
        resumed = [(e2, t2, s["__key__"]) for (e2, t2, s) in itertools.islice(iter_stream(plan, 5, e, t), 1000 - start)]
        assert resumed == full[start:], start


def test_resampled_is_infinite_and_seeded(small_demo):
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    plan = StreamPlan(shards, weights, "resampled", 0, 2, 100)
    a = [s["__key__"] for (_, _, s) in itertools.islice(iter_stream(plan, 1, 0, 0), 5000)]
    b = [s["__key__"] for (_, _, s) in itertools.islice(iter_stream(plan, 1, 0, 0), 5000)]
    assert a == b and len(a) == 5000 and len(set(a)) <= 2000  # past one pass over the data, with repeats


def _loader(small_demo, workers, batch=32, seed=0, streams=0):
    import open_clip

    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    decoder = SampleDecoder(("jpg",), "json:captions", 32, (0.9, 1.0), seed)
    return TrainLoader(
        shards,
        weights,
        decoder,
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=seed,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=batch,
        window=100,
        streams=streams,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_dict_resumes_exact_batches(small_demo, workers):
    loader = _loader(small_demo, workers)
    batches = [next(loader) for _ in range(9)]
    assert all(b["image"].shape == (32, 3, 32, 32) and b["image"].dtype == torch.uint8 for b in batches)
    fresh = _loader(small_demo, workers)
    for _ in range(4):
        next(fresh)
    state = fresh.state_dict()
    restored = _loader(small_demo, workers)
    restored.load_state_dict(state)
    for expected in batches[4:]:
        got = next(restored)
        assert got["keys"] == expected["keys"]
        assert torch.equal(got["image"], expected["image"]) and torch.equal(got["text"], expected["text"])


def test_loader_resumes_on_other_worker_counts_but_not_other_streams(small_demo):
    """data.streams, not data.num_workers, fixes the order: a state taken with 2 workers resumes with 0 or 4 to
    the same batches; a state of another stream count is refused, naming data.streams."""
    ref = _loader(small_demo, 2, streams=4)
    batches = [next(ref)["keys"] for _ in range(6)]
    ref.close()
    for workers in (0, 4):
        first = _loader(small_demo, 2, streams=4)
        for _ in range(3):
            next(first)
        state = first.state_dict()
        first.close()
        resumed = _loader(small_demo, workers, streams=4)
        assert "another layout" in resumed.load_state_dict(state)
        assert [next(resumed)["keys"] for _ in range(3)] == batches[3:]
        resumed.close()
    with pytest.raises(DataError, match="data.streams"):
        _loader(small_demo, 1, streams=8).load_state_dict(state)


def test_restore_decodes_only_what_it_delivers(small_demo, monkeypatch):
    """Resuming deep into an epoch reads tar members to skip, but decodes only the images it delivers."""
    from clipkit.data import transforms

    loader = _loader(small_demo, 0)
    for _ in range(40):  # 40 x 32 = 1280 samples into the 2000-sample epoch
        next(loader)
    state = loader.state_dict()
    expected = next(loader)["keys"]
    decodes = []
    real = transforms.train_image
    monkeypatch.setattr(transforms, "train_image", lambda *a, **k: decodes.append(1) or real(*a, **k))
    restored = _loader(small_demo, 0)
    restored.load_state_dict(state)
    assert next(restored)["keys"] == expected
    assert len(decodes) == 32
