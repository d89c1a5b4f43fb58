"""Atomic, verified checkpoint directories.

A checkpoint is ``<run>/checkpoints/step_XXXXXXXX/``. It is written under a temporary name; every file and
folder is fsynced, a manifest with every file's size and SHA-256 is written last (fsynced), then the directory
is renamed into place and the parent folder fsynced. Re-saving an existing step moves the old one aside first
(restored by ``find_latest`` if the save dies before its replacement lands), so there is never a moment with
neither. A directory without
a valid manifest (killed mid-save, truncated, bit-flipped) is never loaded: ``find_latest`` falls back to the
newest one that verifies, warning with the offending file's name. Tensors go to safetensors; everything else
to JSON or ``torch.save`` files that load with ``weights_only=True`` (no arbitrary pickles).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipkit.errors import UserError

log = logging.getLogger("clipkit")

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CorruptCheckpoint(UserError, RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(
    root: Path,
    step: int,
    write: Callable[[Path], Future | None],
    keep_last: int = 0,
    meta: dict | None = None,
    *,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    at: Callable[[str, int], None] = lambda point, step: None,
) -> Path | PendingSave:
    """Writes checkpoint ``step`` under ``root``; returns its dir. Called by every rank of a job.

    The main rank creates the temporary dir; every rank runs ``write(tmp_dir)`` (sharded engines write their
    own shards; the shared dir must be on a file system all ranks see); then the main rank adds the manifest
    (every file, subfolders included), renames the dir into place and prunes to ``keep_last``. ``at(point,
    step)`` is called at the named points of the save (the reliability suite's fault injection hooks in there).

    Asynchronous saves: when ``write`` returns a future (the engine's shards are still being written in the
    background, after a synchronous copy of the state), ``save`` returns a ``PendingSave`` at once; the main rank
    publishes (manifest, rename, prune) from a background thread when the future completes, which for torch
    DCP's ``async_save`` on the main (coordinator) rank means every rank's shards and the metadata are written.
    Until then the checkpoint is an unpublished temporary dir that ``find_latest`` never loads.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"  # the same name on every rank and node
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed mid-save
        tmp.mkdir(parents=True)
        at("save_start", step)
    barrier()
    background = write(tmp)
    at("save_shards", step)  # (every rank: its own part written or, asynchronously, copied)
    if background is not None:
        publish = (lambda: _publish(root, tmp, final, step, keep_last, meta, at)) if is_main else None
        return PendingSave(final, background, publish)
    barrier()
    if is_main:
        _publish(root, tmp, final, step, keep_last, meta, at)
    barrier()
    return final


class PendingSave:
    """An asynchronous save in flight: ``wait()`` blocks until its files are written and (main rank) published,
    re-raising any error of the background write."""

    def __init__(self, path: Path, background: Future, publish: Callable[[], None] | None):
        self.path, self.background, self.error = path, background, None
        self.thread = threading.Thread(target=self._finish, args=(publish,), name="clipkit-ckpt", daemon=True)
        self.thread.start()

    def _finish(self, publish: Callable[[], None] | None) -> None:
        try:
            self.background.result()
            if publish is not None:
                publish()
        except BaseException as err:  # re-raised in the training loop by wait()
            self.error = err

    def wait(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.path


def _publish(root: Path, tmp: Path, final: Path, step: int, keep_last: int, meta: dict | None, at) -> None:
    """Main rank: manifest written last and fsynced, then the atomic, durable rename; then pruning."""
    at("save_written", step)
    files = {
        p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    _fsync_tree(tmp)  # every file and folder on disk before the manifest can vouch for them
    manifest = {"step": step, "files": files, **(meta or {})}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    at("save_manifest", step)
    aside = root / f".old_{final.name}"
    if final.exists():  # re-saving a step (e.g. after a resume): move it aside, never delete it first
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)  # the publish: atomic, then made durable
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)
    at("save_done", step)
    if keep_last > 0:
        for old in list_steps(root)[:-keep_last]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file below ``path``, then every folder (deepest first), then ``path`` itself."""
    dirs = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            dirs.append(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(d)
    _fsync_dir(path)


def _restore_aside(root: Path) -> None:
    """A save killed between moving an existing step aside and renaming its replacement in: put it back."""
    for aside in root.glob(".old_step_*"):
        final = root / aside.name[len(".old_") :]
        if not final.exists() and _STEP_DIR.match(final.name):
            os.replace(aside, final)
            log.warning("restored %s, set aside by a save that did not finish", final)


def list_steps(root: Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m[1]) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def verify(path: Path) -> dict:
    """Checks the manifest against every file; returns it, or raises ``CorruptCheckpoint`` naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CorruptCheckpoint(f"{manifest_path}: missing or unreadable manifest ({err.__class__.__name__})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info["size"]:
            raise CorruptCheckpoint(f"{f}: size {f.stat().st_size} != {info['size']} in the manifest (truncated?)")
        if _sha256(f) != info["sha256"]:
            raise CorruptCheckpoint(f"{f}: SHA-256 differs from the manifest (corrupted)")
    return manifest


def listed(path: Path, name: str) -> bool:
    """Whether ``name`` is one of checkpoint ``path``'s files by its manifest. A file added to a checkpoint after
    it was written (a planted ``ema.safetensors``) is not part of it and is never loaded."""
    try:
        return name in json.loads((Path(path) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False


def find_latest(root: Path) -> Path | None:
    """Newest checkpoint under ``root`` that verifies; corrupt ones are skipped with a warning."""
    if Path(root).is_dir():
        _restore_aside(Path(root))
    for step in reversed(list_steps(root)):
        path = step_dir(root, step)
        try:
            verify(path)
            return path
        except CorruptCheckpoint as err:
            log.warning("skipping corrupt checkpoint: %s", err)
    return None


def resolve(path: Path) -> Path:
    """A verified checkpoint dir from a checkpoint dir or a run dir (its newest complete checkpoint)."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file():
        verify(path)
        return path
    latest = find_latest(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {path} (looked for {path / 'checkpoints'}/step_*)")
    return latest


def weights_file(path: Path) -> Path:
    """The model weights behind ``path``: a .safetensors file, an exported open_clip folder, or what ``resolve``
    accepts (a checkpoint dir or a run dir)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if (path / "open_clip_model.safetensors").is_file():
        return path / "open_clip_model.safetensors"
    return resolve(path) / "model.safetensors"


# --------------------------------------------------------------------------------------------- file helpers


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def save_torch(path: Path, obj) -> None:
    torch.save(obj, path)


def load_torch(path: Path):
    """A ``torch.save`` file of tensors and plain containers; anything that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpoint(f"{path}: refused to unpickle (more than tensors and plain data): {first}") from None


def save_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))


def load_json(path: Path):
    return json.loads(Path(path).read_text())
