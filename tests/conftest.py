"""Shared fixtures: a small demo dataset (generated once per session) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# A demo world small enough for tests: 2,000 training pairs in 4 shards of uneven size.
SMALL_DEMO = [
    "data.demo.num_train=2000",
    "data.demo.num_zeroshot=360",
    "data.demo.num_retrieval=200",
    "data.demo.shard_size=600",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clipkit-cache")
    os.environ["CLIPKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def small_demo(cache_dir) -> Path:
    """The small demo data set, generated through the same code path as `clipkit train`."""
    from clipkit.config import DataConfig, DemoDataConfig
    from clipkit.data import ensure_demo

    cfg = DataConfig(
        cache_dir=str(cache_dir),
        demo=DemoDataConfig(num_train=2000, num_zeroshot=360, num_retrieval=200, shard_size=600),
    )
    return ensure_demo(cfg, say=lambda m: None)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False):
    """Runs `python -m clipkit ARGS` in a subprocess; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "clipkit", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"clipkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
