"""Data: shard specs, the deterministic resumable stream, decode/augment, shard writing, demo data."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
from multiprocessing import forkserver
from pathlib import Path

from clipkit.data.config import DataConfig


def demo_dir(cfg: DataConfig) -> Path:
    from clipkit.data.demo import cache_name

    return Path(os.path.expanduser(cfg.cache_dir)) / cache_name(cfg.demo)


def ensure_demo(cfg: DataConfig, num_procs: int = 2, say=print) -> Path:
    """Generates the demo data once (under a file lock, so concurrent ranks or runs wait) and returns its dir."""
    from clipkit.data.demo import generate

    out = demo_dir(cfg)
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            say(f"generating demo data in {out} (once) ...")
            generate(cfg.demo, out, num_procs=num_procs)
            done.touch()
    return out


def dir_spec(directory: Path) -> str:
    """A shard spec for every ``*.tar`` in ``directory`` (sorted)."""
    stems = sorted(p.stem for p in Path(directory).glob("*.tar"))
    if not stems:
        raise FileNotFoundError(f"no .tar shards in {directory}")
    return str(Path(directory) / (stems[0] if len(stems) == 1 else "{" + ",".join(stems) + "}")) + ".tar"


def train_spec(cfg: DataConfig, demo: Path | None) -> str:
    return dir_spec(demo / "train") if cfg.train == "demo" else cfg.train


def worker_context(start: bool = False):
    """Loader workers start from a fork server: forking the training process itself, whose loader threads and
    queue feeders may hold a lock at that moment, can leave a child stuck right after fork. ``start``: launch
    the server now: it imports torch and open_clip once, in the background, while the caller does the same (the
    CLI starts it before its own heavy imports, so both run at once on two cores). Light: no torch imported
    here."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "open_clip", "clipkit.data.loader", "clipkit.eval.data"])
    if start:
        forkserver.ensure_running()
    return ctx
