"""A 2-rank run resumed on 1 rank (another world size and worker count): by the trained sample keys
(``train.record_keys``), every sample of the interrupted epoch is trained exactly once."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

from clipkit.distributed import free_port
from tests.conftest import SMALL_DEMO, run_cli

ARGS = [
    *SMALL_DEMO,
    "train.global_batch_size=32",
    "train.checkpoint_every=10",
    "train.record_keys=true",
    "optim.warmup_steps=2",
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
]


def test_two_ranks_resumed_on_one(small_demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [*cmd, "-m", "clipkit", "train", f"hydra.run.dir={tmp_path}", *ARGS, "train.steps=10", "data.num_workers=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("train", f"hydra.run.dir={tmp_path}", *ARGS, "train.steps=75", "data.num_workers=2", timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "re-planned from 2 rank(s) x 1 worker(s) to 1 x 2" in second.stderr
    trained = collections.Counter()
    for path in (tmp_path / "keys").glob("rank_*.jsonl"):
        for line in path.read_text().splitlines():
            for epoch, key in json.loads(line)["keys"]:
                trained[(epoch, key)] += 1
    epoch0 = {k: n for (e, k), n in trained.items() if e == 0}
    assert len(epoch0) == 2000 and set(epoch0.values()) == {1}  # none lost, none twice
