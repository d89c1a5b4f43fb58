"""Workers hand over chunks of at most ``CHUNK`` samples and the loader joins them into micro-batches (issue 27):
the shared memory in flight no longer grows with the per-rank batch. Checked by what the workers hand over, the
batches that come out, and an exact resume between micro-batches."""

from __future__ import annotations

import open_clip
import pytest

from clipkit.data import dir_spec, loader
from clipkit.data.loader import SampleDecoder, TrainLoader, chunk_size, resolve_shards


@pytest.mark.parametrize(
    "batch,chunk",
    [(16, 16), (256, 256), (4096, 256), (1000, 250), (384, 192), (514, 514), (12288, 256)],
)
def test_chunk_size(batch, chunk):
    assert chunk_size(batch) == chunk
    assert batch % chunk == 0


def make(small_demo, workers: int) -> TrainLoader:
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    return TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "json:captions", 32, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=128,
        window=32,
    )


def test_workers_hand_over_chunks_that_join_into_batches_and_resume_exactly(small_demo, monkeypatch):
    # a per-rank batch of 128 (64 per worker and step) in chunks of 32, from 2 workers in turn
    monkeypatch.setattr(loader, "CHUNK", 32)
    handed: list[tuple[int, int]] = []
    next_chunk = TrainLoader._next_chunk

    def recorded(self):
        part = next_chunk(self)
        handed.append((part["worker"], len(part["keys"])))
        return part

    monkeypatch.setattr(TrainLoader, "_next_chunk", recorded)
    ref = make(small_demo, 2)
    assert ref.chunk == 32
    batches = [next(ref) for _ in range(6)]
    ref.close()
    assert [len(b["keys"]) for b in batches] == [128] * 6 and all(b["image"].shape[0] == 128 for b in batches)
    assert all(b["text"].shape[0] == 128 and len(b["epochs"]) == 128 for b in batches)
    assert handed[:6] == [(0, 32), (1, 32)] * 3  # every hand-over is one chunk, the workers in turn
    keys = [k for b in batches for k in b["keys"]]
    assert len(set(keys)) == len(keys)

    # Resume between micro-batches (after 2): the next 4 are the same samples in the same order.
    first = make(small_demo, 2)
    for _ in range(2):
        next(first)
    state = first.state_dict()
    first.close()
    resumed = make(small_demo, 2)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(4)]
    resumed.close()
    assert [b["keys"] for b in rest] == [b["keys"] for b in batches[2:]]
    assert all((r["image"] == b["image"]).all() for r, b in zip(rest, batches[2:], strict=True))


@pytest.mark.parametrize(
    "cpus,bound,env,train,want",
    [
        (16, False, {}, "/d/{0..9}.tar", 15),  # one rank on a 16-core GPU host: all but one core
        (96, False, {"LOCAL_WORLD_SIZE": "8"}, "/d/{0..9}.tar", 11),  # 8 ranks share 96 cores (torchrun)
        (96, False, {"SLURM_NTASKS_PER_NODE": "8(x2)"}, "/d/{0..9}.tar", 11),  # srun's form of the same
        (96, True, {"LOCAL_WORLD_SIZE": "8"}, "/d/{0..9}.tar", 11),  # bound to its own 12 cores already
        (2, False, {}, "/d/{0..9}.tar", 1),  # the 2-core laptop: one worker beside training
        (256, False, {}, "/d/{0..9}.tar", 32),  # capped
        (16, False, {}, "demo", 1),  # the embedded demo needs one
    ],
)
def test_default_workers_follow_the_host(monkeypatch, cpus, bound, env, train, want):
    import os

    from clipkit.data.config import DataConfig

    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12 if bound else cpus)))
    assert DataConfig(train=train).workers() == want
    assert DataConfig(train=train, num_workers=3).workers() == 3  # (an explicit count is kept)
