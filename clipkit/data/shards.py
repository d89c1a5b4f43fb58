"""Shard specs: brace patterns, ``::``-joined weighted sources, and per-shard sample counts.

A spec is ``SOURCE[::SOURCE...]``; each source is a webdataset URL pattern (local path, ``file://``, or
``pipe:CMD``) with an optional ``@WEIGHT`` suffix, e.g.
``/data/laion/{00000..09999}.tar@0.8::/data/cc12m/{000..999}.tar@0.2``.
Sample counts come from ``sizes.json`` beside the shards, img2dataset's ``NNNNN_stats.json`` (``successes``),
or, for local files, a scan of tar headers (no data is read).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import braceexpand

from clipkit.data.writer import SIZES_FILE

_WEIGHT = re.compile(r"^(?P<url>.+)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


class ShardSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0


def expand_spec(spec: str, check_exists: bool = False, allow_pipe: bool = True) -> list[Source]:
    """Parses a shard spec into sources; optionally checks that local shards exist (naming the first missing)."""
    if not spec or not spec.strip():
        raise ShardSpecError("empty shard spec")
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        match = _WEIGHT.match(part)
        url, weight = (match["url"], float(match["weight"])) if match else (part, 1.0)
        if weight <= 0:
            raise ShardSpecError(f"source weight must be > 0 in {part!r}")
        urls = tuple(braceexpand.braceexpand(url))
        if not urls:
            raise ShardSpecError(f"pattern {url!r} expands to no shards")
        for u in urls:
            if u.startswith("pipe:"):
                if not allow_pipe:
                    raise ShardSpecError(f"pipe: URLs are refused (data.allow_pipe=false): {u!r}")
            elif check_exists and not local_path(u).is_file():
                missing = sum(not local_path(x).is_file() for x in urls)
                raise ShardSpecError(f"shard not found: {u} ({missing} of {len(urls)} shards of this source missing)")
        sources.append(Source(urls, weight))
    return sources


def is_shard_spec(spec: str) -> bool:
    """Whether a dataset string names tar shards (rather than a folder, a table or a JSON file)."""
    return ".tar" in spec or "::" in spec or spec.startswith(("pipe:", "file:"))


def local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()


@cache
def _sizes_file(directory: str) -> dict[str, int]:
    path = Path(directory) / SIZES_FILE
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def count_tar_samples(path: Path) -> int:
    """Number of distinct keys in a local tar, from its headers only (tarfile seeks over member data)."""
    keys, last = 0, None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name = member.name.rsplit("/", 1)
            stem = (name[0] + "/" if len(name) == 2 else "") + name[-1].split(".", 1)[0]
            if stem != last:
                keys, last = keys + 1, stem
    return keys


def announced_size(url: str) -> int:
    """A shard's sample count as its sizes.json / _stats.json announce it (0 if neither does); no tar read."""
    path = local_path(url)
    sizes = _sizes_file(str(path.parent))
    if path.name in sizes:
        return sizes[path.name]
    stats = path.with_name(path.stem + "_stats.json")
    return int(json.loads(stats.read_text())["successes"]) if stats.is_file() else 0


def shard_size(url: str) -> int | None:
    """Sample count of one shard from sizes.json, img2dataset stats, or a header scan; None if unknowable."""
    if url.startswith("pipe:"):
        return None
    path = local_path(url)
    sizes = _sizes_file(str(path.parent))
    if path.name in sizes:
        return sizes[path.name]
    stats = path.with_name(path.stem + "_stats.json")
    if stats.is_file():
        return int(json.loads(stats.read_text())["successes"])
    if path.is_file():
        return count_tar_samples(path)
    return None
