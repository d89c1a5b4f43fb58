"""The reading side of cached tower features (``data.cache_*_features``; built by ``feature_cache.py``): one
kind's cache folder, its shards' row ids and memory-mapped rows, looked up by the loader's decoder."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

IMAGE, TEXT, TEACHER_IMAGE, TEACHER_TEXT = "image", "text", "teacher_image", "teacher_text"
MAX_OPEN = 128  # shards a loader worker keeps open (a memory map each): more than the streams it reads at once


def shard_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:24]


def caption_id(caption: str) -> str:
    """A caption row's id: a digest of the caption text."""
    return hashlib.sha1(caption.encode()).hexdigest()[:20]


class FeatureCache:
    """Reads (and writes) one kind's cache folder: ``lookup(url, row_id)`` is a row (float32, whatever the storage
    dtype), or None when the cache has none (its shard was not embedded, or the sample was bad then). Pickled into
    the loader workers as its folder alone; each worker opens the shards it meets."""

    def __init__(self, folder: Path, kind: str = IMAGE, dtype: str = "float32"):
        self.folder, self.kind, self.dtype = Path(folder), kind, str(dtype)
        self._open: OrderedDict[str, tuple[dict, np.ndarray] | None] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "kind": self.kind, "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["kind"], state["dtype"])

    def nbytes(self, urls: list[str]) -> int:
        """The disk the rows of these shards take (those done)."""
        paths = (self.folder / f"{shard_id(u)}{suffix}" for u in urls for suffix in (".npy", ".keys.npy"))
        return sum(p.stat().st_size for p in paths if p.is_file())

    def done(self, url: str) -> bool:
        return (self.folder / f"{shard_id(url)}.npy").is_file()

    def lookup(self, url: str, row_id: str) -> torch.Tensor | None:
        table = self._table(url)
        if table is None:
            return None
        row = table[0].get(row_id)
        return None if row is None else torch.from_numpy(np.array(table[1][row], dtype=np.float32))

    def _table(self, url: str) -> tuple[dict, np.ndarray] | None:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        table = None
        if self.done(url):
            sid = shard_id(url)
            ids = np.load(self.folder / f"{sid}.keys.npy").tolist()
            table = ({k: i for i, k in enumerate(ids)}, np.load(self.folder / f"{sid}.npy", mmap_mode="r"))
        self._open[url] = table
        if len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)
        return table

    def write(self, url: str, ids: list[str], rows: np.ndarray) -> None:
        """One shard's ids and rows (stored as ``dtype``), the rows last and each file under a temporary name
        first."""
        sid = shard_id(url)
        for suffix, array in ((".keys.npy", np.array(ids, dtype=str)), (".npy", rows.astype(self.dtype))):
            path = self.folder / f"{sid}{suffix}"
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
