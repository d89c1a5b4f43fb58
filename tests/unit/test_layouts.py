"""Issue 30: one sample order for every layout. The global batches are a function of (seed, data, global batch,
data.streams) only: every admitted (ranks x workers) layout yields the same sample keys per step, and a data
state saved on one layout resumes on any other to the batches of an uninterrupted run. Ranks are simulated
in-process here (one TrainLoader per rank); tests/integration/test_engines.py trains through torchrun."""

from __future__ import annotations

import open_clip
import pytest

from clipkit.data import dir_spec
from clipkit.data.config import DataConfig, layout_problem
from clipkit.data.loader import DataError, SampleDecoder, TrainLoader, resolve_shards

BATCH, STREAMS, STEPS = 48, 12, 8


def loaders(
    small_demo, world: int, workers: int, micro: int = 0, streams: int = STREAMS, mode: str = "epoch"
) -> list[TrainLoader]:
    shards, weights = resolve_shards(dir_spec(small_demo / "train"))
    return [
        TrainLoader(
            shards,
            weights,
            SampleDecoder(("jpg",), "json:captions", 32, (0.9, 1.0), 0),
            open_clip.get_tokenizer("ViT-B-32"),
            mode=mode,
            seed=0,
            rank=rank,
            world_size=world,
            num_workers=workers,
            batch_size=micro or BATCH // world,
            window=240,
            streams=streams,
            global_batch=BATCH,
        )
        for rank in range(world)
    ]


def steps(ranks: list[TrainLoader], n: int) -> list[list[tuple[int, str]]]:
    """Each step's (epoch, key) pairs over all ranks, sorted (the rows' order is the layout's)."""
    out = []
    for _ in range(n):
        rows = []
        for loader in ranks:
            for _ in range(BATCH // len(ranks) // loader.batch_size):
                batch = next(loader)
                rows += zip(batch["epochs"], batch["keys"], strict=True)
        out.append(sorted(rows))
    return out


def close(ranks: list[TrainLoader]) -> None:
    for loader in ranks:
        loader.close()


@pytest.fixture(scope="module")
def reference(small_demo):
    ranks = loaders(small_demo, 1, 0)
    got = steps(ranks, STEPS)
    close(ranks)
    return got


# (world, workers, micro-batch): in-process, DataLoader workers, gradient-cached micro-batches
@pytest.mark.parametrize("world,workers,micro", [(2, 0, 0), (3, 0, 0), (4, 0, 0), (12, 0, 0), (1, 3, 0), (2, 2, 12)])
def test_every_admitted_layout_trains_on_the_same_batches(small_demo, reference, world, workers, micro):
    ranks = loaders(small_demo, world, workers, micro)
    got = steps(ranks, STEPS)
    close(ranks)
    assert got == reference
    # 8 steps of 48 cross no epoch (2000 samples), but every stream gave 4 per step: 32 of its 166-167
    assert all(len(step) == BATCH and len({k for _, k in step}) == BATCH for step in got)


def test_resume_moves_through_layouts_to_the_uninterrupted_batches(small_demo, reference):
    """2 ranks -> 1 process with 3 workers -> 4 ranks -> 2 ranks with 2 workers, 2 steps each."""
    got, states = [], None
    for world, workers in ((2, 0), (1, 3), (4, 0), (2, 2)):
        ranks = loaders(small_demo, world, workers)
        if states is not None:
            notes = {loader.load_state_dict(states) for loader in ranks}
            assert len(notes) == 1 and "another layout" in notes.pop()
        got += steps(ranks, 2)
        states = [loader.state_dict() for loader in ranks]
        close(ranks)
    assert got == reference
    delivered = sum(st["samples_delivered"] for st in states)
    assert delivered == STEPS * BATCH  # (the counts follow the streams: rank 0 took the others' on each change)


def test_the_streams_not_the_layout_fix_the_order(small_demo, reference):
    (other,) = loaders(small_demo, 1, 0, streams=24)
    assert steps([other], 2) != reference[:2]  # another data.streams is another order (same samples per epoch)
    with pytest.raises(DataError, match="data.streams"):
        other.load_state_dict(loaders(small_demo, 1, 0)[0].state_dict())


def test_resampled_draws_are_layout_free_too(small_demo):
    """data.mode=resampled: each stream draws its shards from (seed, its index), so 1 process and 4 ranks train
    on the same samples per step."""
    got = []
    for world in (1, 4):
        ranks = loaders(small_demo, world, 0, mode="resampled")
        got.append(steps(ranks, 4))
        close(ranks)
    assert got[0] == got[1] and all(len(step) == BATCH for step in got[0])


def test_state_is_taken_between_steps_only(small_demo):
    (loader,) = loaders(small_demo, 1, 0, micro=12)
    next(loader)
    with pytest.raises(RuntimeError, match="into a step"):
        loader.state_dict()


@pytest.mark.parametrize(
    "batch,streams", [(128, 64), (96, 48), (1000, 40), (32, 32), (7, 7), (256, 64), (48, 48), (100, 50)]
)
def test_automatic_stream_count(batch, streams):
    assert DataConfig().stream_count(batch) == streams
    assert DataConfig(streams=16).stream_count(batch) == 16


def test_layout_rules_name_the_field_and_the_admitted_values():
    assert layout_problem(48, 96, 4, 3) is None  # 4 ranks x 3 workers: 4 streams each
    assert layout_problem(48, 96, 1, 0) is None
    field, message = layout_problem(48, 96, 4, 5)
    assert field == "data.num_workers" and "[1, 2, 3, 4, 6, 12]" in message
    field, message = layout_problem(48, 96, 5, 1)
    assert field == "data.streams" and "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]" in message
    field, message = layout_problem(40, 96, 1, 1)
    assert field == "data.streams" and "must divide train.global_batch_size=96" in message


def test_default_workers_are_the_most_the_host_allows_that_the_streams_admit(monkeypatch):
    import os

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    config = DataConfig(train="/d/{0..9}.tar")
    assert config.workers() == 15
    assert config.workers(64) == 8 and config.workers(48) == 12 and config.workers(7) == 7
    assert layout_problem(64, 128, 1, config.workers(64)) is None


def test_a_stream_whose_whole_span_is_bad_stops_with_a_message(tmp_path):
    """One shard of 20 samples whose last 10 have no caption, read as 2 streams: stream 1's span is all bad in
    every epoch (one shard: the permutation cannot move it), so it stops after DRY_EPOCHS whole epochs, naming
    the stream and data.streams, instead of spinning through epochs."""
    from clipkit.data.loader import DRY_EPOCHS
    from clipkit.data.writer import write_shard, write_sizes_file
    from tests.shardsets import jpeg

    samples = [
        {"__key__": f"k{i:02d}", "jpg": jpeg((200, 30, 30)), **({"txt": "a"} if i < 10 else {})} for i in range(20)
    ]
    write_shard(tmp_path / "00000.tar", samples)
    write_sizes_file(tmp_path, {"00000.tar": 20})
    shards, weights = resolve_shards(f"{tmp_path}/00000.tar")
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "txt", 32, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        batch_size=2,
        window=0,
        streams=2,
    )
    with pytest.raises(DataError, match=f"loader stream 1 of data.streams=2 went through {DRY_EPOCHS} whole epochs"):
        for _ in range(100):
            next(loader)
