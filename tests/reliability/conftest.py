"""Fixtures shared by the reliability cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.harness import srun_train, train


@pytest.fixture(scope="session")
def fsdp_ref(small_demo, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank ``parallel=fsdp`` run: what every interrupted FSDP run must end identical to
    (synchronous and asynchronous saves compute the same thing, so it serves both)."""
    ref = tmp_path_factory.mktemp("fsdp") / "ref"
    assert all(rc == 0 for rc, _ in srun_train(ref, "parallel=fsdp")), "reference FSDP run failed"
    return ref


@pytest.fixture(scope="session")
def plain_ref(small_demo, tmp_path_factory) -> Path:
    """One uninterrupted single-process run with the harness's defaults: what the interrupted runs of the
    kill-during-save, signal and corrupt-checkpoint cases must end identical to (one run instead of one per case;
    no case writes into it)."""
    ref = tmp_path_factory.mktemp("plain") / "ref"
    assert train(ref).returncode == 0, "reference run failed"
    return ref
