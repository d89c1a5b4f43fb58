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
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"evil\.pt: refused to unpickle .*[Ww]eights only"):
        ckpt.load_torch(tmp_path / "evil.pt")
    assert not marker.exists()  # refused without running the payload


def test_a_metrics_line_torn_by_kill9_does_not_stop_the_resume(tmp_path):
    """kill -9 mid-write leaves half a JSON line at the end of metrics.jsonl (and keys/rank_NNN.jsonl): the
    resume drops it with the lines past the checkpoint instead of crashing."""
    import json

    from clipkit.metrics import KeyLog, RunLogger

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')
    RunLogger(tmp_path, True, 10, 4, False, None, {})
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "rank_000.jsonl").write_text('{"step": 1, "keys": []}\n{"step": 2, "ke')
    KeyLog(tmp_path, 0, 4)
    assert (tmp_path / "keys" / "rank_000.jsonl").read_text() == '{"step": 1, "keys": []}\n'


def test_republishing_a_step_never_leaves_a_window_without_it(tmp_path, monkeypatch):
    """Saving a step that exists (a resume re-saving it): a crash between taking the old directory away and
    renaming the new one into place must leave a loadable checkpoint; files and directories are fsynced before
    the rename publishes them."""
    import os

    from clipkit import checkpoint as ckpt

    def writer(value):
        return lambda d: ckpt.save_json(d / "state.json", {"value": value})

    ckpt.save(tmp_path, 8, writer("old"))
    synced = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))

    def crash_on_publish(src, dst):
        if str(src).endswith(".tmp_step_00000008"):
            raise OSError("killed before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    with pytest.raises(OSError, match="killed"):
        ckpt.save(tmp_path, 8, writer("new"))
    monkeypatch.setattr(os, "replace", real_replace)
    latest = ckpt.find_latest(tmp_path)
    assert latest == tmp_path / "step_00000008" and ckpt.load_json(latest / "state.json") == {"value": "old"}
    assert any(p.endswith("state.json") for p in synced) and any(p.endswith(".tmp_step_00000008") for p in synced)
    ckpt.save(tmp_path, 8, writer("new"))
    assert ckpt.load_json(ckpt.find_latest(tmp_path) / "state.json") == {"value": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008"]
