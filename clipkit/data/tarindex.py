"""Where each sample of a local, uncompressed tar shard starts, so that a stream whose span begins at sample ``j``
of a shard seeks there instead of reading (never decoding) samples ``0 .. j-1`` first.

Without it, each of the C streams that begins inside a shard reads that shard's prefix once per epoch: with 32
streams over 600-sample shards that was ~30,000 tar members read to train 384 samples, most of a short run's
time, and most of the wait for a run's first batch (benchmarks/RESULTS.md).

What a sample is stays webdataset's decision: the index applies the same rules as its ``tar_file_iterator`` and
``group_by_keys`` (regular files only; ``__meta__`` members skipped; the key is the name up to the first dot of
its last path part; a new sample where the key changes), and only the reader's webdataset pipeline ever reads a
member's data. The index is conservative: it stops (the rest of the shard is read from its start, as before) at
anything it does not model: a header it cannot parse or whose checksum fails, pax / GNU long-name headers, links
and other member types, a repeated file name within a sample (webdataset fails there), a member larger than half
``data.max_member_mb`` (the reader stops there). A sample reached by a seek must carry the key the index recorded
for it (``Reader`` checks, and falls back to reading from the start if not), so a wrong count can never train
other samples silently.

Cached per process (``CACHE_SIZE`` shards, least recently used first out) by path, size, modification time and
the member bound.
"""

from __future__ import annotations

import os
import re
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

BLOCK = 512
CACHE_SIZE = 64
SKIP_META = re.compile(r"__[^/]*__($|/)")  # (webdataset's tar_file_iterator default ``skip_meta``)
REGULAR, DIRECTORY = (b"0", b"\0"), b"5"


def key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogateescape"))


@dataclass
class SampleIndex:
    """``offsets[j]``: the byte offset of the header of sample j's first member; ``hashes[j]``: ``key_hash`` of
    its key. Covers samples ``0 .. len(offsets) - 1`` (the whole shard, or the part before where it stopped)."""

    offsets: array = field(default_factory=lambda: array("q"))
    hashes: array = field(default_factory=lambda: array("I"))

    def __len__(self) -> int:
        return len(self.offsets)


def _octal(raw: bytes) -> int | None:
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None  # (base-256 sizes, garbage: not modelled)


def build(path: str, member_cap: int = 0) -> SampleIndex:
    """Scans the tar's headers (no member data is read). ``member_cap``: the reader's bound on one member (bytes,
    0 for none); the index stops before a sample holding a member above half of it."""
    index = SampleIndex()
    key, suffixes, start = None, set(), 0
    with open(path, "rb", buffering=0) as f:
        end = os.fstat(f.fileno()).st_size
        offset = 0
        while True:
            if offset == end:
                return _complete(index, key, start)
            f.seek(offset)
            header = f.read(BLOCK)
            if header == bytes(BLOCK):
                return _complete(index, key, start)  # the end-of-archive blocks
            if len(header) < BLOCK:
                break  # a short tail: the reader reports what is wrong there
            checksum = _octal(header[148:156])
            if checksum is None or checksum != sum(header) - sum(header[148:156]) + 8 * 32:
                break
            size, kind = _octal(header[124:136]), header[156:157]
            if size is None:
                break
            name, prefix = header[0:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
            if prefix:  # (a ustar long name; read as tarfile reads it, whatever the magic)
                name = prefix + b"/" + name
            fname = name.decode("utf-8", "surrogateescape")
            if kind == b"\0" and fname.endswith("/"):
                kind = DIRECTORY
            if kind not in REGULAR and kind != DIRECTORY:
                break  # (pax and GNU long-name headers, links, devices: not modelled)
            following = offset + BLOCK + -(-size // BLOCK) * BLOCK
            if following > end:
                break  # truncated: the reader reports it
            if kind in REGULAR and not _skipped(fname):
                prefix, suffix = base_plus_ext(fname)
                if prefix is not None:
                    suffix = suffix.lower()
                    if prefix != key:
                        _complete(index, key, start)
                        key, suffixes, start = prefix, set(), offset
                    if suffix in suffixes or (member_cap and size > member_cap // 2):
                        return index  # (the sample in progress is left out: the reader fails or stops in it)
                    suffixes.add(suffix)
            offset = following
    return index  # (stopped early: the sample in progress is left out)


def _complete(index: SampleIndex, key: str | None, start: int) -> SampleIndex:
    """Appends the sample in progress (key ``key``, first header at ``start``), if there is one."""
    if key is not None:
        index.offsets.append(start)
        index.hashes.append(key_hash(key))
    return index


def _skipped(fname: str) -> bool:
    """What webdataset's ``tar_file_iterator`` skips (besides non-regular members)."""
    if "/" not in fname and fname.startswith(meta_prefix) and fname.endswith(meta_suffix):
        return True
    return SKIP_META.match(fname) is not None


_CACHE: OrderedDict[tuple, SampleIndex | None] = OrderedDict()


def lookup(path: str, member_cap: int = 0) -> SampleIndex | None:
    """The index of the tar at ``path`` (built on first use, then cached), or None where it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = (path, st.st_size, st.st_mtime_ns, member_cap)
    if ident in _CACHE:
        _CACHE.move_to_end(ident)
        return _CACHE[ident]
    try:
        index = build(path, member_cap)
    except OSError:
        index = None
    _CACHE[ident] = index
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return index


def forget(path: str) -> None:
    """Drops ``path``'s index (a seek that did not find the recorded key: never used again in this process)."""
    for ident in [i for i in _CACHE if i[0] == str(path)]:
        _CACHE[ident] = None
