"""Checkpoint directories: atomic, verified by manifest, pruned to keep_last, newest complete one found."""

from __future__ import annotations

import os

import pytest
import torch

from clipkit import checkpoint as ckpt


def _write(tmp):
    ckpt.save_tensors(tmp / "model.safetensors", {"w": torch.arange(1000.0)})
    ckpt.save_json(tmp / "trainer.json", {"step": 1})


def test_save_verify_and_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save(tmp_path, step, _write, keep_last=2)
    assert ckpt.list_steps(tmp_path) == [30, 40]
    assert ckpt.find_latest(tmp_path) == ckpt.step_dir(tmp_path, 40)
    manifest = ckpt.verify(ckpt.step_dir(tmp_path, 40))
    assert set(manifest["files"]) == {"model.safetensors", "trainer.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage, caplog):
    for step in (10, 20):
        ckpt.save(tmp_path, step, _write)
    target = ckpt.step_dir(tmp_path, 20) / "model.safetensors"
    if damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (ckpt.step_dir(tmp_path, 20) / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CorruptCheckpoint) as err:
        ckpt.verify(ckpt.step_dir(tmp_path, 20))
    assert ("manifest" if damage == "manifest" else "model.safetensors") in str(err.value)
    assert ckpt.find_latest(tmp_path) == ckpt.step_dir(tmp_path, 10)
    assert "skipping corrupt checkpoint" in caplog.text


def test_partial_directory_is_never_chosen(tmp_path):
    ckpt.save(tmp_path, 10, _write)

    def crash(tmp):
        _write(tmp)
        raise KeyboardInterrupt  # killed mid-save

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 20, crash)
    assert ckpt.list_steps(tmp_path) == [10]
    assert ckpt.find_latest(tmp_path) == ckpt.step_dir(tmp_path, 10)


def test_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        ckpt.load_torch(tmp_path / "evil.pt")
