"""Soak: the end-of-training eval of a 2-rank DDP run, many times. Before the loader workers started from a fork
server, 1 run in 4 hung here (an eval worker stuck right after fork while the training loader's threads were
alive). Slow: ``CLIPKIT_SOAK_RUNS`` runs (default 8), each must finish well inside its time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import SMALL_DEMO
from tests.ports import free_port

pytestmark = pytest.mark.slow


def test_distributed_final_eval_never_hangs(small_demo, tmp_path):
    runs = int(os.environ.get("CLIPKIT_SOAK_RUNS", "8"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(runs):
        run = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        cmd += ["-m", "clipkit", "train", f"hydra.run.dir={run}", *SMALL_DEMO, "train.steps=10", "eval.num_workers=2"]
        cmd += [
            "logging.progress=false",
            "logging.report=false",
            "parallel.timeout_s=120",
            "train.global_batch_size=32",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"run {i}: {proc.stderr[-3000:]}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["eval"]["zeroshot"]["num_samples"] == 360, i
