"""The training loader: canonical streams -> decode/augment/tokenize in DataLoader workers -> micro-batches.

Rank r reads its share of the canonical streams (see ``stream.py`` for the contract), each DataLoader worker
an equal part of it. Per global batch every stream gives B/C good samples; a worker hands over its streams'
samples in *chunks*, and torch's DataLoader takes chunks from its workers round-robin, strictly in order, so
every step's rows are the same samples on any admitted layout. Each chunk carries its streams' positions, so
``state_dict()`` (taken between steps) is exact: every stream continues where its last *consumed* sample
ended (chunks prefetched but never consumed are produced again), on this layout or another.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import random
import select
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, _utils, get_worker_info

from clipkit import preempt
from clipkit.data import transforms, worker_context
from clipkit.data.config import layout_problem
from clipkit.data.feature_rows import IMAGE, TEACHER_IMAGE, TEACHER_TEXT, TEXT, FeatureCache, caption_id
from clipkit.data.shards import expand_spec, remote, shard_sizes
from clipkit.data.stream import MISSING, UNANNOUNCED, UNKNOWN, Reader, ShardTable, StreamPlan, iter_stream
from clipkit.errors import UserError

log = logging.getLogger("clipkit")
STATE_VERSION = 2  # (2: positions of canonical streams; 1 was per (rank, worker) slot)
# A worker stops the run when none of its first CAPTION_PROBE samples has a caption (a wrong caption key), and
# when, after BAD_CHECK_AFTER samples, the bad fraction exceeds data.max_bad_fraction (or nothing was usable).
CAPTION_PROBE = 16
BAD_CHECK_AFTER = 1000
# A stream that reads this many whole epochs in a row without one usable sample stops the run: its 1/C of every
# epoch is bad (a missing shard larger than a stream's span lands in one stream's span that often only by a
# chance of about (missing fraction)^DRY_EPOCHS), so it would otherwise spin through epochs forever.
DRY_EPOCHS = 8
AUTO_CAPTION = "auto"


class BadSample(Exception):
    def __init__(self, kind: str, members: str = ""):
        super().__init__(kind)
        self.kind, self.members = kind, members


class DataError(UserError, RuntimeError):
    """Unusable training data (too many bad samples, unknown sizes, resume with another layout)."""


def _members(sample: dict) -> str:
    """What a raw sample holds, for error messages: ``jpg, json {caption, url, ...}, txt``."""
    out = []
    for k in sorted(k for k in sample if not k.startswith("__")):
        if k == "json":
            try:
                out.append("json {" + ", ".join(sorted(json.loads(sample[k]))) + "}")
                continue
            except Exception:
                pass
        out.append(k)
    return ", ".join(out) or "nothing"


@dataclass
class SampleDecoder:
    """Raw tar sample -> (uint8 CHW image, caption); raises ``BadSample(kind)``. Seeded per (seed, epoch, shard
    name, key): the shard's name is its path relative to its source pattern, so moving the data changes nothing.

    ``caption_key``: ``auto`` (a ``txt`` member, else the ``json`` member's ``caption``, else its ``captions``:
    img2dataset and clipkit's own shards), ``txt`` (or any member), or ``json:FIELD``. ``captions`` (``data.captions``)
    mixes several sources instead: ((source, probability), ...), one drawn per sample and epoch among the sources
    the sample has (their probabilities renormalised), from its own seeded stream (crops do not change with it);
    ``source`` then names the one a call used.

    ``caches`` (``data.cache_*_features``, kind -> ``FeatureCache``): ``image`` gives the locked image tower's
    embedding in place of the image, undecoded (a sample it lacks, bad when the cache was built, is decoded to say
    why; one that decodes after all counts as ``uncached``); ``text`` the locked text tower's embedding of the
    caption drawn, in place of the caption; ``teacher_image`` and ``teacher_text`` the teacher's two embeddings,
    joined, in ``teacher_row``. A caption row the cache lacks counts as ``uncached``."""

    image_keys: tuple[str, ...]
    caption_key: str
    image_size: int
    crop_scale: tuple[float, float]
    seed: int
    captions: tuple[tuple[str, float], ...] = ()
    source: str | None = None
    caches: dict[str, FeatureCache] = field(default_factory=dict)
    teacher_row: torch.Tensor | None = None

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, str | torch.Tensor]:
        where = f"{self.seed}/{epoch}/{sample.get('__shard__', '')}/{sample['__key__']}"
        rng = random.Random(where)
        caption = (
            self.mixed_caption(sample, random.Random(where + "/caption"))
            if self.captions
            else self.caption(sample, rng)
        )
        image = self.image(sample, rng)
        if not self.caches:
            return image, caption
        text = self._row(TEXT, sample, caption_id(caption)) if TEXT in self.caches else caption
        self.teacher_row = None
        if TEACHER_IMAGE in self.caches:
            parts = (
                self._row(TEACHER_IMAGE, sample, sample["__key__"]),
                self._row(TEACHER_TEXT, sample, caption_id(caption)),
            )
            self.teacher_row = torch.cat(parts)
        return image, text

    def image(self, sample: dict, rng: random.Random) -> torch.Tensor:
        """The sample's crop (uint8 CHW), or its cached image row."""
        cache = self.caches.get(IMAGE)
        if cache is not None:
            row = cache.lookup(sample.get("__url__", ""), sample["__key__"])
            if row is not None:
                return row
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise BadSample("no_image")
        try:
            image = transforms.train_image(data, self.image_size, self.crop_scale, rng)
        except Exception:
            raise BadSample("bad_image") from None
        if cache is not None:
            raise BadSample("uncached")
        return image

    def _row(self, kind: str, sample: dict, row_id: str) -> torch.Tensor:
        row = self.caches[kind].lookup(sample.get("__url__", ""), row_id)
        if row is None:
            raise BadSample("uncached")
        return row

    def candidates(self, sample: dict) -> list[str]:
        """Every caption this decoder may give the sample in some epoch (cached caption rows cover them all)."""
        try:
            if self.captions:
                values = [self._source_value(sample, key) for key, _ in self.captions]
            elif self.caption_key == AUTO_CAPTION and "txt" in sample:
                values = [sample["txt"]]
            elif self.caption_key == AUTO_CAPTION:  # (json: its caption, else its captions)
                found = (self._json_field(sample, f) for f in ("caption", "captions"))
                values = [next((v for v in found if v is not None), None)]
            else:
                values = [self._source_value(sample, self.caption_key)]
        except BadSample:  # (unreadable json: no caption)
            return []
        out = []
        for value in values:
            for item in value if isinstance(value, list) else [value]:
                try:
                    out.append(self._check(item, sample))
                except BadSample:
                    pass
        return list(dict.fromkeys(out))

    def mixed_caption(self, sample: dict, rng: random.Random) -> str:
        """``data.captions``: one of the sources the sample has, drawn with their renormalised probabilities."""
        present = [(key, p) for key, p in self.captions if self._source_value(sample, key) is not None]
        if not present:
            raise BadSample("no_caption", _members(sample))
        u, key = rng.random() * sum(p for _, p in present), present[-1][0]
        for k, p in present:
            if u < p:
                key = k
                break
            u -= p
        self.source = key
        return self._check(self._source_value(sample, key), sample, rng)

    def _source_value(self, sample: dict, key: str):
        """The value of a caption source (a member, or ``json:FIELD``) in ``sample``; None if it has none."""
        member, _, field = key.partition(":")
        if member not in sample:
            return None
        return self._json_field(sample, field, member) if field else sample[member]

    def caption(self, sample: dict, rng: random.Random) -> str:
        if self.caption_key == AUTO_CAPTION:
            if "txt" in sample:
                return self._check(sample["txt"], sample)
            for field in ("caption", "captions"):
                value = self._json_field(sample, field)
                if value is not None:
                    return self._check(value, sample, rng)
            raise BadSample("no_caption", _members(sample))
        value = self._source_value(sample, self.caption_key)
        if value is None:
            raise BadSample("no_caption", _members(sample))
        return self._check(value, sample, rng)

    @staticmethod
    def _json_field(sample: dict, field: str, member: str = "json"):
        if member not in sample:
            return None
        try:
            meta = json.loads(sample[member])
        except Exception:
            raise BadSample("bad_caption", _members(sample)) from None
        return meta.get(field) if isinstance(meta, dict) else None

    @staticmethod
    def _check(value, sample: dict, rng: random.Random | None = None) -> str:
        if isinstance(value, list):
            value = rng.choice(value) if value and rng is not None else None
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise BadSample("no_caption", _members(sample))
        if not value.strip():
            raise BadSample("empty_caption")
        return value


def decoded(plan: StreamPlan, decoder: SampleDecoder, stream: int, epoch: int, t: int, reader: Reader | None = None):
    """A canonical stream from (epoch, t), decoded: yields ``(epoch, t, item, url)`` where item is
    ``(image, caption, key, caption source, teacher row)`` (the source: with ``data.captions``, else None; the
    teacher row: with ``data.cache_teacher_features``, else None; image and caption may be cached rows) or a
    ``BadSample``
    (counted by the caller, never raised)."""
    for e, pos, sample in iter_stream(plan, stream, epoch, t, reader):
        url = sample.get("__url__", "?")
        try:
            if sample.get("__missing__"):
                raise BadSample(MISSING)
            if sample.get("__unannounced__"):
                raise BadSample(UNANNOUNCED)
            image, caption = decoder(sample, e)
            extra = getattr(decoder, "source", None), getattr(decoder, "teacher_row", None)
            yield e, pos, (image, caption, sample["__key__"], *extra), url
        except BadSample as bad:
            yield e, pos, bad, url


def watch_parent(pid: int) -> None:
    """Ends this process (``os._exit``) as soon as process ``pid`` (the training process) is gone, wherever this
    process is blocked: a daemon thread waits on a pidfd (Linux), else polls once a second. A fork-server
    worker's parent is the fork server, which lives as long as any of its workers does, so neither
    PR_SET_PDEATHSIG nor torch's own watchdog (both watch the parent) would notice an OOM-killed trainer."""
    try:
        fd = os.pidfd_open(pid)  # readable once the process has exited
    except (AttributeError, OSError):  # not Linux >= 5.3, or the process is already gone
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
            os._exit(1)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, name="clipkit-parent-watch", daemon=True).start()


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: preemption signals are the training process's to handle, and the worker
    ends with the training process (an OOM kill or a node failure must not leave it spinning)."""
    preempt.ignore_in_worker()
    info = get_worker_info()
    trainer = getattr(info.dataset, "trainer_pid", None) if info is not None else None
    if trainer:
        watch_parent(trainer)


class WorkerGuard:
    """A worker's own checks while it reads: the caption probe and the bad fraction. Raises ``DataError`` with
    the message for the run."""

    def __init__(self, caption_key: str, max_bad_fraction: float, captions: tuple[tuple[str, float], ...] = ()):
        self.caption_key, self.max_bad_fraction = caption_key, max_bad_fraction
        self.sources = [source for source, _ in captions]  # data.captions, when it replaces caption_key
        self.seen = self.bad = 0
        self.kinds: collections.Counter = collections.Counter()
        self.urls: collections.Counter = collections.Counter()
        self.caption_failures = 0

    def good(self) -> None:
        self.seen += 1
        self._check()

    def failed(self, bad: BadSample, url: str) -> None:
        self.seen += 1
        self.bad += 1
        self.kinds[bad.kind] += 1
        self.urls[url] += 1
        if bad.kind in ("no_caption", "bad_caption") and self.seen == self.caption_failures + 1:
            self.caption_failures += 1
            if self.caption_failures == CAPTION_PROBE:
                if self.sources:
                    setting, looked = f"data.captions=[{','.join(self.sources)}]", ", ".join(map(repr, self.sources))
                else:
                    setting = f"data.caption_key={self.caption_key}"
                    auto = self.caption_key == AUTO_CAPTION
                    looked = "a txt member, the json member's caption or captions" if auto else repr(self.caption_key)
                raise DataError(
                    f"none of the first {CAPTION_PROBE} samples has a caption ({setting}: looked for {looked}); the "
                    f"samples hold: {bad.members} (e.g. in {url}). Set {setting.split('=')[0]} to the member (txt, or "
                    "json:FIELD) that holds the caption"
                )
        self._check()

    def _check(self) -> None:
        if self.seen % 100 == 0:
            check_bad_fraction(
                self.bad, self.seen, self.kinds, self.urls, self.max_bad_fraction, "read by one loader worker "
            )


def check_bad_fraction(bad: int, seen: int, kinds, urls, limit: float, who: str = "") -> None:
    """Raises ``DataError`` naming the worst shards when, after ``BAD_CHECK_AFTER`` samples, more than ``limit`` of
    them (or all) were bad."""
    if seen >= BAD_CHECK_AFTER and (bad > limit * seen or bad == seen):
        worst = ", ".join(f"{u} ({n})" for u, n in urls.most_common(3))
        raise DataError(
            f"{bad} of {seen} samples {who}were bad ({dict(kinds)}), above data.max_bad_fraction={limit}; worst "
            f"shards: {worst or 'n/a'}"
        )


def stop_workers(it, kill: bool = False) -> None:
    """Shuts down a DataLoader iterator's workers. ``kill`` (error and interrupt paths): SIGKILL at once, since
    a worker stuck reading a shard never sees torch's done event and ignores SIGTERM, and torch's own shutdown
    would wait 10 s per such worker; otherwise torch's graceful shutdown, then SIGKILL for any survivor."""
    if it is None:
        return
    workers = list(getattr(it, "_workers", []))
    if kill and workers:
        if getattr(it, "_worker_pids_set", False):  # out of torch's SIGCHLD watch before they die
            _utils.signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(timeout=5)
        # Each worker takes the lock of torch's shared 'workers done' event for an instant, whenever it asks
        # whether the event is set; one killed in that instant leaves the lock held, and torch's shutdown, which
        # sets the event, would wait for it forever. The workers are gone: the shutdown gets an event of this
        # process's own.
        if hasattr(it, "_workers_done_event"):
            it._workers_done_event = threading.Event()
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


@dataclass(frozen=True)
class Layout:
    """Who reads which canonical stream: rank ``rank`` of ``world_size``, ``workers`` DataLoader workers (0: in
    the training process, as one). Each step takes ``per_stream`` samples from every stream."""

    streams: int
    per_stream: int
    rank: int
    world_size: int
    workers: int

    @property
    def slots(self) -> int:
        return max(1, self.workers)

    @property
    def rank_streams(self) -> list[int]:
        n = self.streams // self.world_size
        return list(range(self.rank * n, (self.rank + 1) * n))

    def streams_of(self, worker: int) -> list[int]:
        n = self.streams // (self.world_size * self.slots)
        return self.rank_streams[worker * n : (worker + 1) * n]

    @property
    def step_rows(self) -> int:
        """This rank's samples per step."""
        return self.per_stream * len(self.rank_streams)


class BatchStream(IterableDataset):
    """Yields chunks of the streams of one worker (or of the whole rank in-process). A fatal data problem found
    by the worker travels as a ``{"fatal": message}`` item; ``progress`` (shared memory) holds each stream's
    (epoch, t, segment, sample-in-shard) and, at its end, the stream each worker is reading (stall watchdog)."""

    def __init__(
        self,
        plan: StreamPlan,
        layout: Layout,
        decoder: SampleDecoder,
        tokenizer,
        chunk: int,
        positions: dict[int, tuple[int, int]],
        reader: Reader,
        max_bad_fraction: float,
        progress,
        teacher_tokenizer=None,
    ):
        self.plan, self.layout, self.decoder, self.tokenizer, self.chunk = plan, layout, decoder, tokenizer, chunk
        self.teacher_tokenizer = teacher_tokenizer  # (distillation from a teacher with its own tokenizer)
        self.positions, self.reader = positions, reader
        self.max_bad_fraction, self.progress = max_bad_fraction, progress
        # A fork-server worker inherits the fork server's environment, frozen when it started: carry this
        # process's (storage credentials and endpoints set since then) and apply it in the worker.
        self.environ = dict(os.environ)
        self.trainer_pid = os.getpid()  # the process the workers must not outlive (see watch_parent)

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            os.environ.update(self.environ)
        worker = info.id if info else 0
        try:
            yield from self._batches(worker)
        except DataError as err:
            yield {"fatal": str(err), "worker": worker}

    def _batches(self, worker: int):
        streams = self.layout.streams_of(worker)
        local = worker * len(streams)  # this worker's first stream, counted within the rank's
        readers = [dataclasses.replace(self.reader) for _ in streams]
        for k, reader in enumerate(readers):
            reader.progress, reader.base = self.progress, 4 * (local + k)
        current = 4 * len(self.layout.rank_streams) + worker  # where the stream being read is noted
        sources = [
            decoded(self.plan, self.decoder, c, *self.positions[c], reader)
            for c, reader in zip(streams, readers, strict=True)
        ]
        positions = {c: self.positions[c] for c in streams}
        guard = WorkerGuard(self.decoder.caption_key, self.max_bad_fraction, self.decoder.captions)
        chunk = Chunk()
        dry: dict[int, int] = {}  # stream -> the epoch of its first bad sample since its last good one
        while True:  # one step: per_stream good samples from each stream, in turn
            for k, (c, source) in enumerate(zip(streams, sources, strict=True)):
                self.progress[current] = local + k
                p, taken = 4 * (local + k), 0
                while taken < self.layout.per_stream:
                    epoch, t, item, url = next(source)
                    self.progress[p], self.progress[p + 1] = epoch, t + 1
                    positions[c] = (epoch, t + 1)
                    if isinstance(item, BadSample):
                        chunk.failed(item, epoch, url)
                        guard.failed(item, url)
                        dry.setdefault(c, epoch)
                        if epoch > dry[c] + DRY_EPOCHS:  # (epochs dry[c] + 1 .. + DRY_EPOCHS had nothing usable)
                            raise DataError(dry_stream_message(c, self.plan.streams, epoch - 1, item, url))
                        continue
                    dry.pop(c, None)
                    guard.good()
                    chunk.add(item, epoch, c * self.layout.per_stream + taken)
                    taken += 1
                    if len(chunk.keys) == self.chunk:
                        yield chunk.handed(self, worker, positions, sum(r.num_retries for r in readers))
                        chunk = Chunk()
                        for r in readers:
                            r.num_retries = 0


def dry_stream_message(stream: int, streams: int, epoch: int, bad: BadSample, url: str) -> str:
    return (
        f"loader stream {stream} of data.streams={streams} went through {DRY_EPOCHS} whole epochs (up to {epoch}) "
        "without a usable "
        f"sample (the last: {bad.kind} in {url}): each stream reads 1/{streams} of every epoch, so a bad region that "
        "large (a missing or broken shard, or data that is mostly bad) leaves it nothing to train on. Fix or "
        "remove the bad shards, or lower data.streams"
    )


class Chunk:
    """The samples (and skip counts) a worker collects until it hands them over."""

    def __init__(self):
        self.images, self.captions, self.keys, self.epochs, self.teacher_rows = [], [], [], [], []
        self.rows = []  # each sample's place in its step's canonical global batch (stream c's are c*B/C + i)
        self.errors: collections.Counter = collections.Counter()
        self.bad_urls: collections.Counter = collections.Counter()
        self.epoch_errors: collections.Counter = collections.Counter()  # "epoch/kind" -> count
        self.sources: collections.Counter = collections.Counter()  # data.captions: samples per caption source

    def add(self, item: tuple, epoch: int, row: int) -> None:
        image, caption, key, source, teacher_row = item
        if source is not None:
            self.sources[source] += 1
        if teacher_row is not None:
            self.teacher_rows.append(teacher_row)
        self.images.append(image)
        self.captions.append(caption)
        self.keys.append(key)
        self.epochs.append(epoch)
        self.rows.append(row)

    def failed(self, bad: BadSample, epoch: int, url: str) -> None:
        self.errors[bad.kind] += 1
        self.epoch_errors[f"{epoch}/{bad.kind}"] += 1
        self.bad_urls[url] += 1

    def handed(self, stream: BatchStream, worker: int, positions: dict, retries: int) -> dict:
        teacher = stream.teacher_tokenizer
        cached_text = torch.is_tensor(self.captions[0])  # (data.cache_text_features: the text tower's rows)
        if self.teacher_rows:  # (data.cache_teacher_features: the teacher's rows in place of its tokens)
            teacher_text = {"teacher_text": torch.stack(self.teacher_rows)}
        else:
            teacher_text = {"teacher_text": teacher(self.captions)} if teacher else {}
        return {
            "image": torch.stack(self.images),
            "text": torch.stack(self.captions) if cached_text else stream.tokenizer(self.captions),
            **teacher_text,
            "keys": self.keys,
            "epochs": self.epochs,
            "rows": self.rows,
            "worker": worker,
            "positions": dict(positions),
            "errors": dict(self.errors),
            "epoch_errors": dict(self.epoch_errors),
            "bad_urls": dict(self.bad_urls),
            "caption_sources": dict(self.sources),
            "retries": retries,
        }


def resolve_shards(spec: str, allow_pipe: bool = True, allow_missing: bool = False) -> tuple[ShardTable, list[float]]:
    """Shards with their sample counts, linear in their number. ``allow_missing``: an absent local shard is
    kept with its announced size (sizes.json; else 0), so the stream counts its samples as ``missing``."""
    sources = expand_spec(spec, check_exists=not allow_missing, allow_pipe=allow_pipe)
    urls = [u for src in sources for u in src.urls]
    names = [src.name(u) for src in sources for u in src.urls]
    source_ids = np.repeat(np.arange(len(sources)), [len(src.urls) for src in sources])
    sizes = shard_sizes(urls)
    if allow_missing:
        for i, u in enumerate(urls):
            if not remote.is_pipe(u) and not remote.is_remote(u) and not remote.local_path(u).is_file():
                sizes[i] = sizes[i] or 0
                log.warning("shard missing: %s (its %d announced samples will count as missing)", u, sizes[i])
    unknown = [u for u, n in zip(urls, sizes, strict=True) if n is None]
    if unknown:
        log.info(
            "sample count unknown for %d shard(s), e.g. %s: each shard is dealt whole to one loader stream and read "
            "to its end; a resume re-reads (without decoding) that stream's shards up to its position. Add "
            "sizes.json beside the shards for exact planning and resumes that skip whole shards",
            len(unknown),
            unknown[0],
        )
    sizes = [UNKNOWN if n is None else n for n in sizes]
    return ShardTable(urls, sizes, source_ids, names), [s.weight for s in sources]


CHUNK = 256  # the most samples a worker hands over at once (see TrainLoader.chunk)


def chunk_size(batch_size: int) -> int:
    """The samples per worker hand-over for a micro-batch of ``batch_size``: the batch itself up to ``CHUNK``;
    above, the largest divisor of it that is at most ``CHUNK`` (the whole batch if that would be under 32)."""
    if batch_size <= CHUNK:
        return batch_size
    best = max(d for d in range(1, CHUNK + 1) if batch_size % d == 0)
    return best if best >= 32 else batch_size


class TrainLoader:
    """Iterator of training micro-batches for this rank, with exact ``state_dict`` / ``load_state_dict``.

    ``streams`` canonical streams (``data.streams``), ``global_batch`` samples per step over all ranks (0: one
    micro-batch per rank); the layout (world size x workers) must be admitted (``config.layout_problem``).

    Waiting for a batch is guarded: no batch for ``stall_timeout_s`` raises ``DataError`` naming the stream, the
    shard and the position it was reading; SIGTERM / SIGUSR1 during the wait end it at once (``preempt``).
    Workers are started by a fork server (no fork of a process whose threads may hold locks), die with the
    training process, and are killed if they do not stop when the loader closes.

    Workers hand over *chunks* of at most ``CHUNK`` samples, in turn, which the loader joins into micro-batches:
    the shared memory in flight is workers x prefetch_factor x chunk, whatever the batch (a per-rank batch of
    4096 at 224 px would otherwise hold 617 MB per worker and prefetch slot; benchmarks/loader_memory.py)."""

    def __init__(
        self,
        shards: ShardTable,
        source_weights: list[float],
        decoder: SampleDecoder,
        tokenizer,
        *,
        mode: str,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        window: int,
        streams: int = 0,
        global_batch: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        max_bad_fraction: float = 0.1,
        stall_timeout_s: float = 0.0,
        retries: int = 5,
        retry_backoff_s: float = 1.0,
        max_member_mb: int = 256,
        num_samples: int = 0,
        teacher_tokenizer=None,
    ):
        global_batch = global_batch or batch_size * world_size
        streams = streams or world_size * max(1, num_workers)
        problem = layout_problem(streams, global_batch, world_size, num_workers)
        if problem is None and (global_batch // world_size) % batch_size:
            problem = ("train.micro_batch_size", f"{batch_size} does not divide a rank's {global_batch // world_size}")
        if problem:
            raise DataError(f"{problem[0]}: {problem[1]}")
        try:
            self.plan = StreamPlan(shards, source_weights, mode, seed, streams, window, num_samples)
        except ValueError as err:
            raise DataError(str(err)) from None
        if self.plan.sized and mode == "epoch" and global_batch > self.plan.total:
            raise DataError(
                f"a global batch of {global_batch} is more than the {self.plan.total} samples of data.train: lower "
                "train.global_batch_size"
            )
        self.layout = Layout(streams, global_batch // streams, rank, world_size, num_workers)
        self.decoder, self.tokenizer, self.batch_size = decoder, tokenizer, batch_size
        self.chunk = chunk_size(math.gcd(batch_size, self.layout.step_rows // self.layout.slots))
        self.teacher_tokenizer = teacher_tokenizer  # batches then carry "teacher_text" too
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_bad_fraction, self.stall_timeout_s = max_bad_fraction, stall_timeout_s
        self.retries, self.retry_backoff_s, self.max_member_mb = retries, retry_backoff_s, max_member_mb
        self.positions = {c: (0, 0) for c in self.layout.rank_streams}  # canonical stream -> (epoch, t)
        self.next_worker = 0
        self.rows = 0  # samples handed out since the last step boundary
        self.errors: collections.Counter = collections.Counter()
        self.epoch_errors: collections.Counter = collections.Counter()  # "epoch/kind" -> count
        self.bad_urls: collections.Counter = collections.Counter()
        self.caption_sources: collections.Counter = collections.Counter()  # data.captions: samples per source
        self.samples_delivered = 0
        self.retried = 0  # transient remote read errors retried (not part of the data position)
        self._iter = None
        self._progress = None

    def _make_iter(self):
        # Each stream's (epoch, t, segment, sample) and each worker's current stream, for the stall message:
        # shared memory, passed to workers by torch's pickler.
        rank_streams = self.layout.rank_streams
        self._progress = torch.zeros(4 * len(rank_streams) + self.layout.slots, dtype=torch.float64)
        for k, c in enumerate(rank_streams):
            self._progress[4 * k], self._progress[4 * k + 1] = self.positions[c]  # (segment, sample: the reader's)
        if self.num_workers:
            self._progress.share_memory_()
        dataset = BatchStream(
            self.plan,
            self.layout,
            self.decoder,
            self.tokenizer,
            self.chunk,
            dict(self.positions),
            Reader(self.retries, self.retry_backoff_s, self.max_member_mb << 20),
            self.max_bad_fraction,
            self._progress,
            self.teacher_tokenizer,
        )
        # Its own generator: the iterator's base seed must not come from torch's global generator, which the model
        # draws from (patch dropout), or a resumed run (whose loader starts at another step) would drift.
        kwargs = dict(
            num_workers=self.num_workers,
            batch_size=None,
            pin_memory=self.pin_memory and self.chunk == self.batch_size,  # (chunks: the joined batch is pinned)
            generator=torch.Generator().manual_seed(self.plan.seed),
        )
        if self.num_workers:
            kwargs.update(
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
                worker_init_fn=worker_init,
                multiprocessing_context=worker_context(),
            )
        return iter(DataLoader(dataset, **kwargs))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [self._next_chunk()]
        while sum(len(p["keys"]) for p in parts) < self.batch_size:
            parts.append(self._next_chunk())
        if len(parts) == 1:
            return parts[0]
        batch = {key: [x for p in parts for x in p[key]] for key in ("keys", "epochs", "rows")}
        for key in ("image", "text", "teacher_text"):
            if key in parts[0]:
                chunks = [p[key] for p in parts]
                shape = (sum(len(c) for c in chunks), *chunks[0].shape[1:])
                # (pinned here, once, for the device copy: the chunks themselves are not pinned, see _make_iter)
                out = torch.empty(shape, dtype=chunks[0].dtype, pin_memory=self.pin_memory)
                batch[key] = torch.cat(chunks, out=out)
        return batch

    def _next_chunk(self) -> dict:
        """The next worker's chunk, in turn; the loader's state moves past it."""
        try:
            with preempt.data_wait(self.stall_timeout_s):
                if self._iter is None:
                    # Starting workers is not interruptible: a Ctrl-C half-way leaves a started worker nobody
                    # tracks, which the interpreter's exit then joins forever. A signal waits until self._iter
                    # holds the iterator (close() can then stop its workers).
                    with preempt.deferred():
                        self._iter = self._make_iter()
                batch = next(self._iter)
        except preempt.DataStall:
            raise DataError(self._stall_message()) from None
        if "fatal" in batch:
            raise DataError(batch["fatal"])
        worker = batch["worker"]
        assert worker == self.next_worker, "DataLoader delivered batches out of order"
        self.positions.update(batch["positions"])
        self.next_worker = (worker + 1) % self.layout.slots
        self.rows = (self.rows + len(batch["keys"])) % self.layout.step_rows
        self.errors.update(batch["errors"])
        self.epoch_errors.update(batch["epoch_errors"])
        self.bad_urls.update(batch["bad_urls"])
        self.caption_sources.update(batch["caption_sources"])
        self.retried += batch["retries"]
        self.samples_delivered += len(batch["keys"])
        self._check_bad_fraction()
        return batch

    def _stall_message(self) -> str:
        worker = self.next_worker
        rank_streams = self.layout.rank_streams
        k = int(self._progress[4 * len(rank_streams) + worker])
        stream = rank_streams[k]
        epoch, t, seg, j = (int(x) for x in self._progress[4 * k : 4 * k + 4].tolist())
        segments = self.plan.span(stream, epoch)[0] if self.plan.sized else self.plan.segments(stream, epoch)
        where = f"reading {segments[seg].url} at its sample {j}" if seg < len(segments) else "at its span's end"
        return (
            f"no batch for data.stall_timeout_s={self.stall_timeout_s:g} s: loader stream {stream} (rank "
            f"{self.layout.rank}, worker {worker}) is at epoch {epoch}, position {t}, {where}; the storage may be "
            "unreachable or too slow (raise data.stall_timeout_s for slow storage)"
        )

    def _check_bad_fraction(self) -> None:
        bad = sum(self.errors.values())
        check_bad_fraction(bad, bad + self.samples_delivered, self.errors, self.bad_urls, self.max_bad_fraction)

    @property
    def epoch(self) -> float:
        """Fractional epochs this rank's streams have consumed (their mean); whole epochs when sizes are unknown
        and data.num_samples is not set."""
        span = self.plan.total / self.plan.streams if self.plan.total > 0 else float("inf")
        return sum(e + t / span for e, t in self.positions.values()) / len(self.positions)

    def state_dict(self) -> dict:
        """This rank's part of the data state; taken between steps (where every stream has given the same count)."""
        if self.rows:
            raise RuntimeError(f"loader state taken {self.rows} samples into a step (only between steps)")
        return {
            "version": STATE_VERSION,
            "mode": self.plan.mode,
            "seed": self.plan.seed,
            "streams": self.plan.streams,
            "per_stream": self.layout.per_stream,
            "num_shards": len(self.plan.shards),
            "total_samples": self.plan.total,
            "world_size": self.layout.world_size,
            "num_workers": self.num_workers,
            "positions": {str(c): list(p) for c, p in self.positions.items()},
            "errors": dict(self.errors),
            "epoch_errors": dict(self.epoch_errors),
            "bad_urls": dict(self.bad_urls.most_common(100)),
            "caption_sources": dict(self.caption_sources),
            "samples_delivered": self.samples_delivered,
        }

    def errors_by_epoch(self) -> dict[str, dict[str, int]]:
        """``{epoch: {kind: count}}`` of this rank's skipped samples (complete for epochs the stream has left)."""
        out: dict[str, dict[str, int]] = {}
        for key, n in sorted(self.epoch_errors.items()):
            epoch, kind = key.split("/", 1)
            out.setdefault(epoch, {})[kind] = n
        return out

    def set_image_size(self, size: int) -> None:
        """Images of ``size`` px from the next step on (``train.stages``): between steps only; the workers restart
        from the streams' positions, as on a resume, so the samples are those the run would have had."""
        if size == self.decoder.image_size:
            return
        if self.rows:
            raise RuntimeError(f"image size changed {self.rows} samples into a step (only between steps)")
        self.close()
        self.decoder = dataclasses.replace(self.decoder, image_size=size)
        self.next_worker = 0

    def use_features(self, caches: dict[str, FeatureCache]) -> None:
        """Batches carry cached rows (float, B x D) from ``caches`` (kind -> cache): the image tower's in ``image``
        instead of pixels (uint8), the text tower's in ``text`` instead of token ids, the teacher's in
        ``teacher_text``. Set before the first batch, or between steps (the workers restart from the streams'
        positions)."""
        if self.rows:
            raise RuntimeError(f"feature caches set {self.rows} samples into a step (only between steps)")
        self.close()
        self.decoder = dataclasses.replace(self.decoder, caches=dict(caches))
        self.next_worker = 0

    def close(self, kill: bool = False) -> None:
        """Stops the worker processes now (``kill``: at once, for error and interrupt paths; see stop_workers)."""
        it, self._iter = self._iter, None
        stop_workers(it, kill)

    def load_state_dict(self, states: dict | list[dict]) -> str | None:
        """Resumes from the data states of every rank of a checkpoint (a single dict: a one-rank run's), on this
        layout or any other the streams admit: each stream continues at its position, so the batches are those
        of an uninterrupted run. Returns a line for the log when the layout changed (None otherwise); the skip
        counts so far then go to rank 0."""
        states = [states] if isinstance(states, dict) else list(states)
        mine = self.state_dict()
        if any(st.get("version") != STATE_VERSION for st in states):
            raise DataError(
                f"the checkpoint's data state has version {states[0].get('version')!r} (this clipkit reads "
                f"{STATE_VERSION}: canonical streams): resume it with the clipkit that wrote it, or start a new run"
            )
        for key in ("mode", "seed", "streams", "per_stream", "num_shards", "total_samples"):
            if any(st.get(key) != mine[key] for st in states):
                field = {"streams": "data.streams", "per_stream": "train.global_batch_size"}.get(key, key)
                raise DataError(
                    f"cannot resume the data stream exactly: the checkpoint has {key}={states[0].get(key)!r}, this "
                    f"run {mine[key]!r} ({field}). Resume with the same data, seed, data.streams and global batch, "
                    "or start a new run directory"
                )
        saved = {int(c): tuple(p) for st in states for c, p in st["positions"].items()}
        lost = sorted(set(self.positions) - set(saved))
        if lost:
            raise DataError(f"the checkpoint's data state has no position for stream(s) {lost[:8]}: it is incomplete")
        self.positions = {c: saved[c] for c in self.positions}
        same = len(states) == self.layout.world_size and all(
            st["world_size"] == self.layout.world_size and st["num_workers"] == self.num_workers for st in states
        )
        counted = [states[self.layout.rank]] if same else states if self.layout.rank == 0 else []
        self.errors, self.epoch_errors = collections.Counter(), collections.Counter()
        self.bad_urls, self.caption_sources = collections.Counter(), collections.Counter()
        self.samples_delivered = 0
        for st in counted:
            self.errors.update(st["errors"])
            self.epoch_errors.update(st.get("epoch_errors", {}))
            self.bad_urls.update(st["bad_urls"])
            self.caption_sources.update(st.get("caption_sources", {}))
            self.samples_delivered += st["samples_delivered"]
        self.next_worker, self.rows, self._iter = 0, 0, None
        if same:
            return None
        before = f"{states[0]['world_size']} rank(s) x {states[0]['num_workers']} worker(s)"
        return (
            f"data streams resumed on another layout ({before} -> {self.layout.world_size} x {self.num_workers}): "
            f"each of the {self.plan.streams} streams continues at its position, the batches are an uninterrupted "
            "run's"
        )
