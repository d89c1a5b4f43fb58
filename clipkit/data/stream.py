"""The deterministic, position-addressable sample streams behind the training loader: one order for every layout.

The data is read as ``C`` *canonical streams* (``data.streams``), a number that belongs to the run, not to the
machines. For each epoch of a stream we compute a plan: which shard ranges it reads (``segments``) and in which
order it emits its samples (``order``). A stream's position is ``(epoch, t)``: the next sample it emits is
``order[t]`` of that epoch's plan. Each is a pure function of (seed, epoch, shards, C) and a stream's samples
are decoded from (seed, epoch, shard name, key), so a stream's sequence of samples, crops and captions is the
same whoever reads it, and a position is a complete checkpoint of a stream.

The contract (``loader.py`` builds the batches): global batch ``s`` holds, from each stream c in turn, its
good samples ``s*B/C .. (s+1)*B/C - 1`` (B = train.global_batch_size; bad samples are skipped within the
stream, where they are, so that too is layout-free). Rank r of W, with K loader workers, reads the streams
``r*C/W .. (r+1)*C/W - 1``, C/(W*K) per worker. A layout is admitted when W*K divides C and C divides B: every
admitted layout trains on the same global batches (rows in another order, which only float summation sees),
and a checkpoint (every stream's position) resumes on any admitted layout.

epoch mode      the shard list is permuted per epoch; the concatenated sample space is cut into C equal
                contiguous spans, one per stream: every sample exactly once per epoch, every stream busy even
                with fewer shards than streams (neighbouring streams read disjoint ranges of one shard).
resampled mode  each stream draws whole shards with replacement, weighted per source, forever.

Within a span, the order is a seeded *windowed shuffle*: sample i is emitted at rank of ``i + U_i * window``
(U_i uniform in [0, 1)), with window = data.shuffle_window / C, so the streams of one reader together hold
about data.shuffle_window samples whatever C is. Because the order is computed on indices, resuming at ``t``
skips the shards before the earliest sample still due without opening them; in that shard (and where a span
begins inside a shard) a local uncompressed tar is entered at the sample itself (``tarindex``: its samples'
header offsets, read once per process), any other is read (never decoded) from its start. Shards of unknown
size are dealt whole to the streams and read to their end: the same order on any layout, but a resume re-reads
(without decoding) a stream's shards up to its position, and epochs are only as even as the shards.
"""

from __future__ import annotations

import bz2
import gzip
import heapq
import logging
import lzma
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from clipkit.data import remote, tarindex

log = logging.getLogger("clipkit")

# Error kinds counted (never raised) while streaming.
MISSING = "missing"  # announced by sizes.json but not delivered (truncated / unreadable tar, a shard that kept failing)
UNANNOUNCED = "unannounced"  # in a shard past the count sizes.json / _stats.json announced (not trained)


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    source: int = 0
    name: str = ""  # the URL relative to its source pattern's folder (seeds use it; see shards.Source.name)


class ShardTable(Sequence):
    """Shards as columns (URLs, names, sample counts, source indices): 10^6 shards cost tens of MB, plan in
    vectorised numpy, and pickle to loader workers quickly. Indexing gives ``Shard``; slicing a sub-table."""

    def __init__(self, urls: list[str], sizes, sources=None, names: list[str] | None = None):
        self.urls = list(urls)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.sources = np.zeros(len(self.urls), np.int32) if sources is None else np.asarray(sources, np.int32)
        self.names = list(names) if names is not None else list(self.urls)

    @classmethod
    def of(cls, shards: list[Shard]) -> ShardTable:
        return cls(
            [s.url for s in shards],
            [s.num_samples for s in shards],
            [s.source for s in shards],
            [s.name or s.url for s in shards],
        )

    def __len__(self) -> int:
        return len(self.urls)

    def take(self, mask) -> ShardTable:
        """The sub-table of the shards where ``mask`` (a boolean array) is true."""
        idx = np.flatnonzero(mask)
        return ShardTable([self.urls[i] for i in idx], self.sizes[idx], self.sources[idx], [self.names[i] for i in idx])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ShardTable(self.urls[i], self.sizes[i], self.sources[i], self.names[i])
        return Shard(self.urls[i], int(self.sizes[i]), int(self.sources[i]), self.names[i])


UNKNOWN_SIZE = -1


@dataclass(frozen=True)
class Segment:
    url: str
    start: int  # first sample index inside the shard
    stop: int  # one past the last
    name: str = ""
    size: int = UNKNOWN_SIZE  # the shard's announced sample count (sizes.json, _stats.json or its headers)


UNKNOWN = UNKNOWN_SIZE  # a shard size nothing announces (pipe:, a remote folder without sizes.json / _stats.json)


class StreamPlan:
    """The plans of the ``streams`` canonical streams; picklable, shipped to DataLoader workers. Linear in the
    shard count. Nothing here knows the ranks or workers that will read the streams.

    With any shard size unknown the plan is *unsized*: each epoch the permuted shards are dealt whole to the
    streams (round robin) and read to their end, the windowed shuffle runs as a stream (``read_stream``), and
    ``total`` is ``num_samples`` (only for the epoch fraction shown in logs)."""

    def __init__(
        self,
        shards: ShardTable | list[Shard],
        source_weights: list[float],
        mode: str,
        seed: int,
        streams: int,
        window: int,
        num_samples: int = 0,
    ):
        if not len(shards):
            raise ValueError("no shards")
        self.shards = shards if isinstance(shards, ShardTable) else ShardTable.of(shards)
        self.mode, self.seed, self.streams = mode, seed, streams
        # data.shuffle_window is the reader's memory, shared by the streams (a worker reads several at once).
        self.window = -(-window // streams) if window > 1 else window
        self.sized = bool((self.shards.sizes >= 0).all())
        self.total = int(self.shards.sizes.sum()) if self.sized else num_samples
        if not self.sized and mode == "epoch" and len(self.shards) < streams:
            raise ValueError(
                f"{len(self.shards)} shards of unknown size cannot feed data.streams={streams} streams (each reads "
                "whole shards): add sizes.json (or _stats.json) beside the shards, or set data.streams to at most "
                f"{len(self.shards)}"
            )
        if self.sized and self.total < streams:
            raise ValueError(f"{self.total} samples cannot feed data.streams={streams} streams")
        per_source = np.bincount(self.shards.sources, minlength=len(source_weights))
        per_shard = np.asarray(source_weights, dtype=np.float64)[self.shards.sources] / per_source[self.shards.sources]
        self.shard_probs = per_shard / per_shard.sum()
        # Resampled "epochs" are chunks of this many shards per stream (only sets the reshuffle granularity).
        self.resampled_shards = max(1, math.ceil(len(self.shards) / streams))

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *words])

    def _segment(self, i: int, start: int, stop: int) -> Segment:
        return Segment(self.shards.urls[i], start, stop, self.shards.names[i], int(self.shards.sizes[i]))

    def segments(self, stream: int, epoch: int) -> list[Segment]:
        if self.mode == "resampled":
            picks = self._rng(1, epoch, stream).choice(len(self.shards), self.resampled_shards, p=self.shard_probs)
            return [self._segment(int(i), 0, int(self.shards.sizes[i])) for i in picks]
        if not self.sized:  # whole shards, read to their end
            perm = self._rng(0, epoch).permutation(len(self.shards))
            return [self._segment(int(i), 0, UNKNOWN) for i in perm[stream :: self.streams]]
        lo, hi = self.bounds(stream)
        return self.range_segments(epoch, lo, hi)

    def bounds(self, stream: int) -> tuple[int, int]:
        """The stream's span [lo, hi) of a sized epoch's sample space."""
        return stream * self.total // self.streams, (stream + 1) * self.total // self.streams

    def range_segments(self, epoch: int, lo: int, hi: int) -> list[Segment]:
        """Shard ranges holding samples [lo, hi) of epoch ``epoch``'s sample space (the permuted shards, end to
        end); the permutation depends on (seed, epoch) only."""
        perm = self._rng(0, epoch).permutation(len(self.shards))
        ends = np.cumsum(self.shards.sizes[perm])
        first, last = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi, side="left"))
        segments = []
        for k in range(first, min(last + 1, len(perm))):
            i, offset = int(perm[k]), int(ends[k] - self.shards.sizes[perm[k]])
            a, b = max(lo, offset), min(hi, int(ends[k]))
            if a < b:
                segments.append(self._segment(i, a - offset, b - offset))
        return segments

    def span(self, stream: int, epoch: int) -> tuple[list[Segment], np.ndarray]:
        """A sized plan's (segments, order) of one stream and epoch: what ``read_span`` reads."""
        segments = self.segments(stream, epoch)
        return segments, self.order(stream, epoch, sum(s.stop - s.start for s in segments))

    def order(self, stream: int, epoch: int, n: int) -> np.ndarray:
        if self.window <= 1:
            return np.arange(n)
        keys = np.arange(n) + self._rng(2, epoch, stream).random(n) * self.window
        return np.argsort(keys, kind="stable")


class MemberTooLarge(ValueError):
    """A tar member larger than ``data.max_member_mb`` (a decompression bomb, or a file that is no sample)."""

    def __init__(self, url: str, cap: int):
        super().__init__(url, cap)
        self.url, self.cap = url, cap

    def __str__(self) -> str:
        return (
            f"a member of {self.url} is larger than data.max_member_mb={self.cap >> 20} (decompressed); the rest of "
            "the shard is skipped and counted as missing (raise data.max_member_mb if such members are real samples)"
        )


# Compressed tars are decompressed here, not by tarfile, so that the bytes tarfile reads can be counted.
_COMPRESSED = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", lambda f: bz2.BZ2File(f, mode="rb")),
    (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, mode="rb")),
)
MEMBER_SLACK = 1 << 20  # headers, skipped metadata members and tarfile's read-ahead between two members


class CappedStream:
    """A shard's tar bytes for webdataset's tar reader, decompressed (gzip, bzip2, xz) and counted: more than
    ``cap`` bytes between two members delivered (``mark``) raise ``MemberTooLarge`` while tarfile is still
    collecting the member, so a member that decompresses to gigabytes costs about ``cap`` of memory, not its
    size. ``cap`` 0: no bound."""

    def __init__(self, raw, url: str, cap: int, detect: bool = True):
        """``detect``: look for a compression magic in the first bytes (False: a plain tar entered at a header)."""
        self.raw, self.url, self.cap, self.since = raw, url, cap, 0
        self._head = raw.read(6) if detect else b""
        self._inner = None
        for magic, opener in _COMPRESSED if detect else ():
            if self._head.startswith(magic):
                self._inner = opener(self._RawTail(self))
                break

    class _RawTail:  # the raw stream with its first bytes (read to detect the compression) put back
        def __init__(self, outer: CappedStream):
            self.outer = outer

        def read(self, n: int = -1) -> bytes:
            return self.outer._raw_read(n)

    def _raw_read(self, n: int = -1) -> bytes:
        head = self._head
        if head:
            if n is None or n < 0:
                self._head = b""
                return head + self.raw.read()
            self._head = head[n:]
            head = head[:n]
            return head if len(head) == n else head + self.raw.read(n - len(head))
        return self.raw.read() if n is None or n < 0 else self.raw.read(n)

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n) if self._inner is not None else self._raw_read(n)
        self.since += len(data)
        if self.cap and self.since > self.cap + MEMBER_SLACK:
            raise MemberTooLarge(self.url, self.cap)
        return data

    def mark(self) -> None:
        """A member was delivered: count the next one from here."""
        self.since = 0

    def close(self) -> None:
        try:
            if self._inner is not None:
                self._inner.close()
        finally:
            self.raw.close()

    def __repr__(self) -> str:
        return self.url


class ShardReadError(OSError):
    """A shard that could not be read to its end (after retries for transient errors)."""

    def __init__(self, url: str, cause: BaseException, attempts: int):
        super().__init__(f"{url}: {type(cause).__name__}: {cause} (after {attempts} attempt(s))")
        self.url, self.cause = url, cause


@dataclass
class Reader:
    """Reads shards in tar order through webdataset's tar expander and key grouping. A transient error
    (connection reset, timeout, HTTP 5xx) re-opens the shard after a backoff and skips the samples already
    delivered; ``retries`` such errors per shard are counted, then the shard fails (``ShardReadError``)."""

    retries: int = 5
    backoff_s: float = 1.0
    max_member_bytes: int = 256 << 20  # data.max_member_mb (0: no bound)
    num_retries: int = 0
    unannounced: dict | None = None  # url -> samples found past its announced size (counted, not trained)
    # Where it reads, for a stall message: the caller sets ``segment`` (its index in the stream's segment list);
    # ``progress[base + 2 : base + 4]`` (shared memory) get (segment, sample index in the shard).
    progress: object = None
    base: int = 0
    segment: int = 0

    def _mark(self, j: int) -> None:
        if self.progress is not None:
            self.progress[self.base + 2], self.progress[self.base + 3] = self.segment, j

    def samples(self, url: str) -> Iterator[dict]:
        for _, sample in self.numbered(url):
            yield sample

    def numbered(self, url: str, start: int = 0) -> Iterator[tuple[int, dict]]:
        """``(j, sample j of the shard)`` for j >= start, in tar order. A local uncompressed tar is entered at the
        first sample due (``tarindex``); any other shard is read from its start, the samples before ``start``
        read but never yielded."""
        delivered, attempt, seek = 0, 0, True  # (start + delivered: the next sample due)
        self._mark(start)
        while True:
            failure: list[BaseException] = []
            record = _recorder(failure)
            stream, reopen = None, False
            try:
                stream, j, expect = self._open(url, start + delivered if seek else 0)
            except Exception as exn:
                failure.append(exn)
            else:
                try:
                    expanded = tar_file_expander([{"url": url, "stream": stream}], handler=record)
                    files = (f for f in expanded if stream.mark() or True)
                    pending = None
                    for sample in group_by_keys(files, handler=record):
                        if expect is not None and tarindex.key_hash(sample["__key__"]) != expect:
                            reopen = True  # (never expected: the index and webdataset disagree on a sample)
                            break
                        expect = None
                        # A sample is complete only once the next one starts (or the tar ends cleanly): hold
                        # one back, so that a connection lost mid-sample never delivers half a sample.
                        if pending is not None:
                            if j >= start + delivered:
                                delivered += 1
                                yield j, pending
                            j += 1
                            self._mark(j)
                        pending = sample
                    if pending is not None and not failure and not reopen and j >= start + delivered:
                        delivered += 1
                        yield j, pending
                finally:
                    _close(stream)
            if reopen:
                log.warning("%s: the sample found at a seek is not the one its index names; read from its start", url)
                tarindex.forget(str(remote.local_path(url)))
                seek = False
                continue
            if not failure:
                return
            err = failure[0]
            if attempt == self.retries or not remote.is_transient(err):
                raise ShardReadError(url, err, attempt + 1)
            self.num_retries += 1
            log.warning("retrying %s after %s: %s (attempt %d)", url, type(err).__name__, err, attempt + 2)
            time.sleep(self.backoff_s * 2**attempt)
            attempt += 1

    def _open(self, url: str, due: int) -> tuple[CappedStream, int, int | None]:
        """(stream, the number of its first sample in the shard, that sample's key hash or None): entered at
        sample ``due`` where the shard's index has it, else at the start."""
        raw = remote.open_stream(url)
        local = due and not remote.is_remote(url) and not remote.is_pipe(url)
        index = tarindex.lookup(str(remote.local_path(url)), self.max_member_bytes) if local else None
        if index is None or due >= len(index):
            return _capped(raw, url, self.max_member_bytes), 0, None
        try:
            raw.seek(index.offsets[due])
        except BaseException:
            _close(raw)
            raise
        return _capped(raw, url, self.max_member_bytes, detect=False), due, index.hashes[due]


def _capped(raw, url: str, cap: int, detect: bool = True) -> CappedStream:
    try:
        return CappedStream(raw, url, cap, detect)
    except BaseException:
        _close(raw)
        raise


def _recorder(failures: list):
    """A webdataset error handler that keeps the error and stops the read."""

    def record(exn: BaseException) -> bool:
        failures.append(exn)
        return False

    return record


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


def iter_shard(url: str, reader: Reader | None = None) -> Iterator[dict]:
    """Samples of one shard in tar order (retrying transient errors); raises ``ShardReadError``."""
    yield from (reader or Reader()).samples(url)


def read_span(
    segments: list[Segment], order: np.ndarray, start: int, reader: Reader | None = None
) -> Iterator[tuple[int, dict]]:
    """Yields ``(t, sample)`` for t >= start in ``order``; where the data never arrived (truncated or unreadable
    shard) ``sample`` is ``{"__missing__": True, "__url__": url}``. Samples carry ``__shard__``, the shard's name."""
    reader = reader or Reader()
    n = len(order)  # (a re-planned span's order covers only some positions of its segments)
    if start >= n:
        return
    seg_offsets = np.cumsum([0] + [s.stop - s.start for s in segments])
    due = np.zeros(int(seg_offsets[-1]), dtype=bool)
    due[order[start:]] = True
    first_due = int(order[start:].min())

    def source() -> Iterator[tuple[int, dict]]:
        for k in range(int(np.searchsorted(seg_offsets, first_due, side="right")) - 1, len(segments)):
            seg, base = segments[k], int(seg_offsets[k])
            reader.segment = k
            try:
                numbered = reader.numbered(seg.url, max(seg.start, first_due - base))
                for j, sample in numbered:
                    if j >= seg.stop:
                        if seg.stop == seg.size:  # the announced end, and the shard goes on: it was under-reported
                            extra = 1 + sum(1 for _ in numbered)
                            reader.unannounced = {**(reader.unannounced or {}), seg.url: extra}
                            log.warning(
                                "%s holds %d more samples than announced (%d): they are not trained; correct its "
                                "count in sizes.json / _stats.json (or remove the file to count from the tar)",
                                seg.url,
                                extra,
                                seg.size,
                            )
                        break
                    if j >= seg.start and due[base + j - seg.start]:
                        sample["__shard__"] = seg.name
                        yield base + j - seg.start, sample
            except ShardReadError as err:  # the shard ends early; its missing samples are counted on emission
                log.warning("shard failed, its remaining samples count as missing: %s", err)

    held: dict[int, dict] = {}
    samples, read_pos = source(), first_due
    for t in range(start, n):
        idx = int(order[t])
        while idx >= read_pos:
            nxt = next(samples, None)
            if nxt is None:
                read_pos = int(seg_offsets[-1])
                break
            read_pos = nxt[0] + 1
            held[nxt[0]] = nxt[1]
        sample = held.pop(idx, None)
        if sample is None:
            k = int(np.searchsorted(seg_offsets, idx, side="right")) - 1
            sample = {"__missing__": True, "__url__": segments[k].url, "__shard__": segments[k].name}
        yield t, sample
    if segments and segments[-1].stop == segments[-1].size:
        next(samples, None)  # one read past the announced end: an under-reported shard shows there (the reader counts)


def read_stream(
    segments: list[Segment], rng: np.random.Generator, window: int, start: int, reader: Reader
) -> Iterator[tuple[int, dict]]:
    """The windowed shuffle of ``plan.order`` as a stream, for shards of unknown size read to their end: the
    i-th sample read gets the key i + U_i * window and samples leave in key order (a key below i + 1 can leave
    once sample i is read: every later key is larger). Yields ``(t, sample)`` for t >= start; the samples before
    ``start`` are read again but never decoded (the caller decodes)."""
    heap: list[tuple[float, int, dict]] = []
    t, i = 0, 0
    for k, seg in enumerate(segments):
        reader.segment = k
        try:
            for sample in reader.samples(seg.url):
                sample["__shard__"] = seg.name
                key = i + (rng.random() * window if window > 1 else 0.0)
                heapq.heappush(heap, (key, i, sample))
                i += 1
                while heap and heap[0][0] < i:
                    _, _, out = heapq.heappop(heap)
                    if t >= start:
                        yield t, out
                    t += 1
        except ShardReadError as err:  # its size is unknown, so what it lost cannot be counted
            log.warning("shard of unknown size failed; the rest of it is skipped: %s", err)
    while heap:
        _, _, out = heapq.heappop(heap)
        if t >= start:
            yield t, out
        t += 1


def iter_stream(
    plan: StreamPlan, stream: int, epoch: int, t: int, reader: Reader | None = None
) -> Iterator[tuple[int, int, dict]]:
    """A canonical stream's endless sequence from position (epoch, t): yields ``(epoch, t, sample)``."""
    reader = reader or Reader()
    while True:
        if plan.sized:
            segments, order = plan.span(stream, epoch)
            samples = read_span(segments, order, t, reader)
        else:
            segments = plan.segments(stream, epoch)
            samples = read_stream(segments, plan._rng(2, epoch, stream), plan.window, t, reader)
        emitted, pos = False, t - 1
        for pos, sample in samples:
            emitted = True
            yield epoch, pos, sample
        for url, extra in (reader.unannounced or {}).items():  # (found at the span's end: counted in its epoch)
            for _ in range(extra):
                yield epoch, pos, {"__unannounced__": True, "__url__": url}
        reader.unannounced = None
        if not emitted and not plan.sized and t == 0:
            raise ShardReadError(segments[0].url if segments else "?", EOFError("no sample in this stream's shards"), 1)
        epoch, t = epoch + 1, 0
