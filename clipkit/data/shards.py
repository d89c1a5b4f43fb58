"""Shard specs: brace patterns, globs, ``::``-joined weighted sources, and per-shard sample counts.

A spec is ``SOURCE[::SOURCE...]``; each source is a URL pattern with an optional ``@WEIGHT`` suffix, e.g.
``/data/laion/{00000..09999}.tar@0.8::s3://bucket/cc12m/{000..999}.tar@0.2``. A URL is a local path (globs
``*?[]`` allowed), ``file://``, ``http(s)://``, ``s3://``, ``gs://`` (read through fsspec) or ``pipe:CMD``.

Sample counts come from ``sizes.json`` beside the shards (one read per folder, remote folders too),
img2dataset's ``NNNNN_stats.json`` (``successes``), or, for local files only, a scan of tar headers. Remote
shards are never read to plan; a shard whose count nothing announces is read to its end (see ``stream.py``).
Every shard also has a *name*: its URL relative to the fixed folder of its source pattern, so that seeds
derived from it do not change when the data moves.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import braceexpand

from clipkit.data import remote
from clipkit.errors import UserError

# The size file beside the shards: shard name -> sample count (written by ``writer.write_sizes_file``).
SIZES_FILE = "sizes.json"
log = logging.getLogger("clipkit")
_WEIGHT = re.compile(r"^(?P<url>.+)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
_PATTERN_CHARS = re.compile(r"[{*?\[]")


class ShardSpecError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0
    base: str = ""  # the pattern's fixed folder (up to its last '/' before any brace or glob), with the '/'

    def name(self, url: str) -> str:
        """``url`` relative to the source's fixed folder: what seeds see, so moving the data changes nothing."""
        return url[len(self.base) :] if self.base and url.startswith(self.base) else url


def pattern_base(pattern: str) -> str:
    """The fixed folder of a URL pattern: ``/data/laion/{0..9}.tar`` -> ``/data/laion/``."""
    if pattern.startswith("pipe:"):
        return ""
    match = _PATTERN_CHARS.search(pattern)
    fixed = pattern[: match.start()] if match else pattern
    return fixed[: fixed.rfind("/") + 1]


def expand_spec(spec: str, check_exists: bool = False, allow_pipe: bool = True) -> list[Source]:
    """Parses a shard spec into sources; optionally checks that local shards exist (naming the first missing).
    Remote shards are not checked here (that would be a request per shard)."""
    if not spec or not spec.strip():
        raise ShardSpecError("empty shard spec")
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        match = _WEIGHT.match(part)
        url, weight = (match["url"], float(match["weight"])) if match else (part, 1.0)
        if weight <= 0:
            raise ShardSpecError(f"source weight must be > 0 in {part!r}")
        urls = []
        has_glob = not remote.is_pipe(url) and not remote.is_remote(url) and globlib.has_magic(url)
        for u in expand_braces(url):
            if has_glob and globlib.has_magic(u):
                found = sorted(globlib.glob(str(remote.local_path(u))))
                if not found:
                    raise ShardSpecError(f"pattern {u!r} matches no file")
                urls += found
            else:
                urls.append(u)
        if not urls:
            raise ShardSpecError(f"pattern {url!r} expands to no shards")
        if urls[0].startswith("pipe:") or any(u.startswith("pipe:") for u in urls):
            if not allow_pipe:
                raise ShardSpecError(f"pipe: URLs are refused (data.allow_pipe=false): {urls[0]!r}")
        elif remote.is_remote(urls[0]):
            remote.check_scheme(urls[0])
        elif check_exists:
            missing = missing_local(urls)
            if missing:
                raise ShardSpecError(
                    f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} shards of this source missing)"
                )
        sources.append(Source(tuple(urls), weight, pattern_base(url)))
    return sources


_RANGE = re.compile(r"^(?P<pre>[^{}]*)\{(?P<a>\d+)\.\.(?P<b>\d+)\}(?P<post>[^{}]*)$")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion; the usual shard pattern (one zero-padded numeric range, ``{0000000..0999999}``) takes a
    direct path, ten times faster than the general expander for 10^6 shards."""
    m = _RANGE.match(pattern)
    if m and len(m["a"]) == len(m["b"]) and int(m["a"]) <= int(m["b"]):
        pre, post, width = m["pre"], m["post"], len(m["a"])
        return [f"{pre}{i:0{width}d}{post}" for i in range(int(m["a"]), int(m["b"]) + 1)]
    return list(braceexpand.braceexpand(pattern))


def missing_local(urls: list[str]) -> list[str]:
    """The local shards of ``urls`` that do not exist: one directory listing per folder, not a stat per shard."""
    listed: dict[str, set[str]] = {}
    missing = []
    for u in urls:
        path = u[len("file://") :] if u.startswith("file://") else u
        folder, _, name = os.path.expanduser(path).rpartition("/")
        names = listed.get(folder)
        if names is None:
            try:
                names = listed[folder] = set(os.listdir(folder or "."))
            except OSError:
                names = listed[folder] = set()
        if name not in names:
            missing.append(u)
    return missing


def is_shard_spec(spec: str) -> bool:
    """Whether a dataset string names tar shards (rather than a folder, a table or a JSON file)."""
    return ".tar" in spec or "::" in spec or spec.startswith(("pipe:", "file:")) or remote.is_remote(spec)


def _split(url: str) -> tuple[str, str]:
    folder, _, name = url.rpartition("/")
    return folder, name


@cache
def _sizes_file(folder: str) -> dict[str, int]:
    """``sizes.json`` of a local or remote folder ({} if it has none)."""
    if remote.is_remote(folder):
        try:
            text = remote.read_small(folder + "/" + SIZES_FILE)
        except remote.RemoteReadError as err:
            raise ShardSpecError(f"cannot read the shard sizes: {err}") from None
    else:
        path = remote.local_path(folder) / SIZES_FILE
        text = path.read_text() if path.is_file() else None
    if text is None:
        return {}
    try:
        data = json.loads(text)
        sizes = {str(k): int(v) for k, v in data.items()}
        if any(v < 0 for v in sizes.values()):
            raise ValueError("a negative count")
    except (ValueError, TypeError, AttributeError) as err:
        raise ShardSpecError(
            f"{folder}/{SIZES_FILE} is not a sizes file ({type(err).__name__}: {err}): it maps each shard's file "
            'name to its sample count, e.g. {"00000.tar": 10000}; fix or remove it (the tars are then counted)'
        ) from None
    return sizes


def _stats_url(url: str) -> str:
    folder, name = _split(url)
    return f"{folder}/{name.rsplit('.', 1)[0]}_stats.json"


def _stats_successes(url: str) -> int | None:
    """img2dataset's ``NNNNN_stats.json`` count, or None if there is none."""
    if remote.is_remote(url):
        try:
            text = remote.read_small(_stats_url(url))
        except remote.RemoteReadError as err:
            raise ShardSpecError(f"cannot read the shard sizes: {err}") from None
    else:
        path = remote.local_path(_stats_url(url))
        text = path.read_text() if path.is_file() else None
    return None if text is None else int(json.loads(text)["successes"])


def count_tar_samples(path: Path) -> int:
    """Number of distinct keys in a local tar, from its headers only (tarfile seeks over member data)."""
    keys, last = 0, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                name = member.name.rsplit("/", 1)
                stem = (name[0] + "/" if len(name) == 2 else "") + name[-1].split(".", 1)[0]
                if stem != last:
                    keys, last = keys + 1, stem
    except tarfile.TarError as err:
        if keys == 0:
            raise ShardSpecError(f"{path} is not a readable tar file ({err}) and no sizes.json announces it") from None
        log.warning("%s is cut short (%s): planned with the %d samples before the cut", path, err, keys)
    return keys


def shard_sizes(urls: list[str], max_parallel: int = 16) -> list[int | None]:
    """Sample counts of many shards: sizes.json (one read per folder), then _stats.json, then (local files) a
    header scan; None where nothing announces it. Linear in the number of shards; remote _stats.json files are
    fetched in parallel, and only while they exist (one missing stops the search for that folder)."""
    out: list[int | None] = [None] * len(urls)
    todo: dict[str, list[int]] = {}  # folder -> shards not in its sizes.json
    for i, url in enumerate(urls):
        if remote.is_pipe(url):
            continue
        folder, name = _split(url)
        n = _sizes_file(folder).get(name)
        if n is not None:
            out[i] = n
        else:
            todo.setdefault(folder, []).append(i)
    for folder, idx in todo.items():
        if remote.is_remote(folder):
            first = _stats_successes(urls[idx[0]])
            if first is None:
                continue
            out[idx[0]] = first
            with ThreadPoolExecutor(max_parallel) as pool:
                for i, n in zip(idx[1:], pool.map(lambda j: _stats_successes(urls[j]), idx[1:]), strict=True):
                    out[i] = n
            continue
        for i in idx:
            n = _stats_successes(urls[i])
            path = remote.local_path(urls[i])
            out[i] = n if n is not None else (count_tar_samples(path) if path.is_file() else None)
    return out
