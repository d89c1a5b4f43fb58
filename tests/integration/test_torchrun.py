"""`clipkit train` under torchrun (2 gloo processes) through the real CLI: same command, distributed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SMALL_DEMO

LAUNCH = Path(__file__).resolve().parents[2] / "launch" / "torchrun_single_node.sh"


def test_two_process_run_via_launch_script(small_demo, tmp_path):
    env = {**os.environ, "NPROC": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = [
        f"hydra.run.dir={tmp_path}",
        *SMALL_DEMO,
        "train.steps=12",
        "train.checkpoint_every=6",
        "train.log_every=3",
        "optim.warmup_steps=3",
        "logging.progress=false",
        "logging.report=false",
        "eval.retrieval.dataset=",
    ]
    proc = subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr and "zero-shot top-1" in proc.stdout
    assert proc.stdout.count("zero-shot top-1") == 1  # rank 0 alone reports and writes
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records if "eval" in r] == [12]  # the final eval is logged too
    trainer = json.loads((tmp_path / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and [d["world_size"] for d in trainer["data"]] == [2, 2]
    # Each rank consumed its own, disjoint share: 12 steps x 64 samples per rank.
    assert all(d["samples_delivered"] == 12 * 64 for d in trainer["data"])
