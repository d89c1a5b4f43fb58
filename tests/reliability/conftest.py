"""Fixtures shared by the reliability cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shared_run
from tests.reliability.harness import srun_train, train


@pytest.fixture(scope="session")
def fsdp_ref(small_demo, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank ``parallel=fsdp`` run: what every interrupted FSDP run must end identical to
    (synchronous and asynchronous saves compute the same thing, so it serves both)."""

    def build(ref: Path) -> None:
        assert all(rc == 0 for rc, _ in srun_train(ref, "parallel=fsdp")), "reference FSDP run failed"

    return shared_run(tmp_path_factory, "fsdp-ref", build)


@pytest.fixture(scope="session")
def plain_ref(small_demo, tmp_path_factory) -> Path:
    """One uninterrupted single-process run with the harness's defaults: what the interrupted runs of the
    kill-during-save, signal and corrupt-checkpoint cases must end identical to (one run instead of one per case;
    no case writes into it; built once for all workers)."""

    def build(ref: Path) -> None:
        assert train(ref).returncode == 0, "reference run failed"

    return shared_run(tmp_path_factory, "plain-ref", build)
