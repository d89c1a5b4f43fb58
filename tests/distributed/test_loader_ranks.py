"""The training loader in real gloo process groups: each epoch covers every sample exactly once across ranks
and DataLoader workers, uneven shards included, with every rank running the same number of steps."""

from __future__ import annotations

import collections
import json

import pytest

from clipkit.data import dir_spec
from tests.distributed.ranks import start_ranks
from tests.distributed.workers import loader_epoch_keys
from tests.ports import free_port


@pytest.mark.parametrize(
    "world,workers",
    [(2, 0), (2, 3), (4, 1)],
)
def test_epoch_exactly_once_across_ranks(small_demo, tmp_path, world, workers):
    out = tmp_path / "keys.json"
    spec = dir_spec(small_demo / "train")
    start_ranks(loader_epoch_keys, (world, free_port(), str(out), spec, workers), nprocs=world)
    ranks = json.loads(out.read_text())
    counts = collections.Counter(k for r in ranks for k in r["keys"])
    assert len(counts) == 2000 and set(counts.values()) == {1}
    assert len({r["steps"] for r in ranks}) == 1  # the same number of steps on every rank
