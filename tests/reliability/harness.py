"""Shared pieces of the reliability suite: the results table, run helpers, and run comparisons.

Fast mode (default) runs few trials per case; ``CLIPKIT_RELIABILITY=long`` runs the full counts. Each case
records (case, trials, passed, figure); the table is printed at the end of the pytest session and written to
``benchmarks/out/reliability.json``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import IN_PROCESS_DATA, SMALL_DEMO, run_cli, srun_tasks

LONG = os.environ.get("CLIPKIT_RELIABILITY") == "long"
RESULTS: list[dict] = []
STEPS = 12
RUN_ARGS = [
    *SMALL_DEMO,
    f"train.steps={STEPS}",
    "train.global_batch_size=32",
    "train.log_every=1",
    "train.checkpoint_every=4",
    "train.keep_last=5",
    "train.record_keys=true",
    "optim.warmup_steps=2",
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
]


def record(case: str, trials: int, passed: int, figure: str) -> None:
    RESULTS.append({"case": case, "trials": trials, "passed": passed, "figure": figure})


long_only = pytest.mark.skipif(
    not LONG, reason="CLIPKIT_RELIABILITY=long runs it (make test's time: its behaviour has a faster case in make test)"
)


def trials(fast: int, long: int) -> int:
    return long if LONG else fast


def rng(case: str) -> random.Random:
    """Random choices (which rank, which step) seeded per case; the seed is printed with failures."""
    seed = int(os.environ.get("CLIPKIT_RELIABILITY_SEED", "0"))
    return random.Random(f"{seed}/{case}")


def train(run_dir: Path, *overrides: str, faults: str = "", timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m clipkit train ...` as a process of its own (``run_cli``: forked from the tests' fork server)."""
    args = ["train", f"hydra.run.dir={run_dir}", *RUN_ARGS, *overrides]
    return run_cli(*args, env={"CLIPKIT_FAULTS": faults}, timeout=timeout)


def train_in_process(run_dir: Path, *overrides: str, faults: str = "", timeout: float = 900):
    """``train`` with the data read in the training process (``IN_PROCESS_DATA``), for the cases whose subject is
    not the loader or its workers (the kill and signal cases keep them)."""
    return train(run_dir, *IN_PROCESS_DATA, *overrides, faults=faults, timeout=timeout)


def srun_train(run_dir: Path, *overrides: str, faults: str = "", timeout: float = 900) -> list[tuple[int, str]]:
    """Two ranks started as SLURM would (srun-style environment): (exit code, stderr) per rank."""
    args = ["train", f"hydra.run.dir={run_dir}", *RUN_ARGS, "parallel.timeout_s=60", *overrides]
    procs = srun_tasks(2, args, extra_env={"CLIPKIT_FAULTS": faults})
    return [(p.wait(timeout), p.communicate()[1]) for p in procs]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def keys(run_dir: Path) -> list[tuple]:
    """Every (epoch, key) the run trained on, all ranks, in (step, rank, position) order (``train.record_keys``)."""
    out = []
    for rank, path in enumerate(sorted((run_dir / "keys").glob("rank_*.jsonl"))):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out += [(rec["step"], rank, i, tuple(k)) for i, k in enumerate(rec["keys"])]
    return [k for *_, k in sorted(out)]


def final_state(run_dir: Path) -> dict:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return {
        "model": load_file(str(ckpt / "model.safetensors")),
        "engine": torch.load(ckpt / "engine.pt", map_location="cpu", weights_only=True),
        # EMA weights and their update count (runs with train.ema_decay > 0)
        "ema": load_file(str(ckpt / "ema.safetensors")) if (ckpt / "ema.safetensors").is_file() else None,
        "ema_updates": json.loads((ckpt / "ema.json").read_text()) if (ckpt / "ema.json").is_file() else None,
    }


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def same_run(run_dir: Path, ref_dir: Path) -> tuple[bool, str]:
    """Bit-identical final parameters, optimizer state and EMA weights, loss curve, and trained sample keys."""
    a, b = final_state(run_dir), final_state(ref_dir)
    if not same_tensors(a["model"], b["model"]):
        return False, "parameters differ"
    if not same_tensors(a["engine"], b["engine"]):
        return False, "optimizer / scheduler state differs"
    if not same_tensors(a["ema"], b["ema"]) or a["ema_updates"] != b["ema_updates"]:
        return False, "EMA weights differ"
    if losses(run_dir) != losses(ref_dir):
        return False, "loss curves differ"
    got, want = keys(run_dir), keys(ref_dir)
    if got != want:
        lost, repeated = len(set(want) - set(got)), len(got) - len(set(got))
        return False, f"sample keys differ ({lost} lost, {repeated} repeated)"
    return True, "identical"
