"""Fixtures shared by the reliability cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.harness import srun_train


@pytest.fixture(scope="session")
def fsdp_ref(small_demo, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank ``parallel=fsdp`` run: what every interrupted FSDP run must end identical to
    (synchronous and asynchronous saves compute the same thing, so it serves both)."""
    ref = tmp_path_factory.mktemp("fsdp") / "ref"
    assert all(rc == 0 for rc, _ in srun_train(ref, "parallel=fsdp")), "reference FSDP run failed"
    return ref
