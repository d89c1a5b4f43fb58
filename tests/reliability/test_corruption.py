"""Case 3: a damaged newest checkpoint (flipped byte, truncated or deleted file) is detected before any tensor
loads, named, and skipped: the run resumes from the previous complete checkpoint and ends identical."""

from __future__ import annotations

import shutil

import pytest

from tests.reliability.harness import record, same_run
from tests.reliability.harness import train_in_process as train  # (the loader is not this case's subject)

pytestmark = pytest.mark.reliability


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def delete(path):
    path.unlink()


@pytest.fixture(scope="module")
def killed_at_10(plain_ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    ref = plain_ref
    base = root / "base"
    assert train(base, faults="kill:step@10").returncode == -9  # checkpoints 4 and 8 exist
    return ref, base


def test_damaged_newest_checkpoint(killed_at_10, tmp_path):
    ref, base = killed_at_10
    cases = [
        (flip, "model.safetensors"),
        (truncate, "engine.pt"),
        (delete, "trainer.json"),
        (truncate, "manifest.json"),
    ]
    passed, fails = 0, []
    for damage, name in cases:
        run = tmp_path / f"{damage.__name__}_{name}"
        shutil.copytree(base, run)
        damage(run / "checkpoints" / "step_00000008" / name)
        resumed = train(run)
        named = f"step_00000008/{name}" in resumed.stderr
        fell_back = f"resumed from {run}/checkpoints/step_00000004" in resumed.stderr
        ok, why = same_run(run, ref) if resumed.returncode == 0 else (False, resumed.stderr[-500:])
        passed += ok and named and fell_back
        if not (ok and named and fell_back):
            fails.append(f"{damage.__name__} {name}: named={named} fell_back={fell_back} {why}")
    record("corrupt newest checkpoint", len(cases), passed, "file named in the warning; resumed from step 4; identical")
    assert not fails, fails
