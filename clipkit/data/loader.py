"""The training loader: slot streams -> decode/augment/tokenize in DataLoader workers -> micro-batches.

Each DataLoader worker runs one slot (see ``stream.py``) and yields whole micro-batches; torch's DataLoader
takes batches from its workers round-robin, strictly in order, so the batch sequence is deterministic.
Each batch carries the position its slot reached, so ``state_dict()`` is exact: after a restart the workers
are re-labelled so that the one due next comes first, and every slot continues where its last *consumed*
batch ended (batches prefetched but never consumed are produced again).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import select
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, _utils, get_worker_info

from clipkit import preempt
from clipkit.data import transforms, worker_context
from clipkit.data.shards import expand_spec, remote, shard_sizes
from clipkit.data.stream import MISSING, UNANNOUNCED, UNKNOWN, Reader, ShardTable, StreamPlan, iter_slot
from clipkit.errors import UserError

log = logging.getLogger("clipkit")
STATE_VERSION = 1
# A worker stops the run when none of its first CAPTION_PROBE samples has a caption (a wrong caption key), and
# when, after BAD_CHECK_AFTER samples, the bad fraction exceeds data.max_bad_fraction (or nothing was usable).
CAPTION_PROBE = 16
BAD_CHECK_AFTER = 1000
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
    ``source`` then names the one a call used."""

    image_keys: tuple[str, ...]
    caption_key: str
    image_size: int
    crop_scale: tuple[float, float]
    seed: int
    captions: tuple[tuple[str, float], ...] = ()
    source: str | None = None

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, str]:
        where = f"{self.seed}/{epoch}/{sample.get('__shard__', '')}/{sample['__key__']}"
        rng = random.Random(where)
        caption = (
            self.mixed_caption(sample, random.Random(where + "/caption"))
            if self.captions
            else self.caption(sample, rng)
        )
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise BadSample("no_image")
        try:
            image = transforms.train_image(data, self.image_size, self.crop_scale, rng)
        except Exception:
            raise BadSample("bad_image") from None
        return image, caption

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


def decoded(plan: StreamPlan, decoder: SampleDecoder, worker: int, epoch: int, t: int, reader: Reader | None = None):
    """A slot's stream from (epoch, t), decoded: yields ``(epoch, t, item, url)`` where item is
    ``(image, caption, key, caption source)`` (the source: with ``data.captions``, else None) or a ``BadSample``
    (counted by the caller, never raised)."""
    for e, pos, sample in iter_slot(plan, worker, epoch, t, reader):
        url = sample.get("__url__", "?")
        try:
            if sample.get("__missing__"):
                raise BadSample(MISSING)
            if sample.get("__unannounced__"):
                raise BadSample(UNANNOUNCED)
            image, caption = decoder(sample, e)
            yield e, pos, (image, caption, sample["__key__"], getattr(decoder, "source", None)), url
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
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


class BatchStream(IterableDataset):
    """Yields micro-batches of one slot per DataLoader worker (or of slot 0 in-process). A fatal data problem
    found by the worker travels as a ``{"fatal": message}`` item; ``progress`` (shared memory) holds each
    worker's (epoch, t, segment, sample-in-shard) for the stall watchdog."""

    def __init__(
        self,
        plan: StreamPlan,
        decoder: SampleDecoder,
        tokenizer,
        batch_size: int,
        positions: list[tuple[int, int]],
        worker_offset: int,
        reader: Reader,
        max_bad_fraction: float,
        progress,
        teacher_tokenizer=None,
    ):
        self.plan, self.decoder, self.tokenizer, self.batch_size = plan, decoder, tokenizer, batch_size
        self.teacher_tokenizer = teacher_tokenizer  # (distillation from a teacher with its own tokenizer)
        self.positions, self.worker_offset, self.reader = positions, worker_offset, reader
        self.max_bad_fraction, self.progress = max_bad_fraction, progress
        # A fork-server worker inherits the fork server's environment, frozen when it started: carry this
        # process's (storage credentials and endpoints set since then) and apply it in the worker.
        self.environ = dict(os.environ)
        self.trainer_pid = os.getpid()  # the process the workers must not outlive (see watch_parent)

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            os.environ.update(self.environ)
        worker = ((info.id if info else 0) + self.worker_offset) % self.plan.num_workers
        try:
            yield from self._batches(worker)
        except DataError as err:
            yield {"fatal": str(err), "worker": worker}

    def _batches(self, worker: int):
        self.reader.progress, self.reader.base = self.progress, 4 * worker
        errors: collections.Counter = collections.Counter()
        bad_urls: collections.Counter = collections.Counter()
        epoch_errors: collections.Counter = collections.Counter()  # "epoch/kind" -> count
        sources: collections.Counter = collections.Counter()  # data.captions: samples per caption source
        guard = WorkerGuard(self.decoder.caption_key, self.max_bad_fraction, self.decoder.captions)
        images, captions, keys, epochs = [], [], [], []
        p = 4 * worker
        for epoch, t, item, url in decoded(self.plan, self.decoder, worker, *self.positions[worker], self.reader):
            self.progress[p], self.progress[p + 1] = epoch, t + 1
            if isinstance(item, BadSample):
                errors[item.kind] += 1
                epoch_errors[f"{epoch}/{item.kind}"] += 1
                bad_urls[url] += 1
                guard.failed(item, url)
                continue
            guard.good()
            if item[3] is not None:
                sources[item[3]] += 1
            images.append(item[0])
            captions.append(item[1])
            keys.append(item[2])
            epochs.append(epoch)
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "text": self.tokenizer(captions),
                    **({"teacher_text": self.teacher_tokenizer(captions)} if self.teacher_tokenizer else {}),
                    "keys": keys,
                    "epochs": epochs,
                    "worker": worker,
                    "position": (epoch, t + 1),
                    "errors": dict(errors),
                    "epoch_errors": dict(epoch_errors),
                    "bad_urls": dict(bad_urls),
                    "caption_sources": dict(sources),
                    "retries": self.reader.num_retries,
                }
                images, captions, keys, epochs = [], [], [], []
                errors, bad_urls, epoch_errors = collections.Counter(), collections.Counter(), collections.Counter()
                sources = collections.Counter()
                self.reader.num_retries = 0


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

    Waiting for a batch is guarded: no batch for ``stall_timeout_s`` raises ``DataError`` naming the slot, the
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
        try:
            self.plan = StreamPlan(
                shards, source_weights, mode, seed, rank, world_size, num_workers, window, num_samples
            )
        except ValueError as err:
            raise DataError(str(err)) from None
        if self.plan.sized and self.plan.total < self.plan.num_slots:
            raise DataError(f"{self.plan.total} samples cannot feed {self.plan.num_slots} (ranks x workers) streams")
        if self.plan.sized and mode == "epoch" and batch_size * world_size > self.plan.total:
            raise DataError(
                f"a batch of {batch_size} per rank x {world_size} rank(s) is more than the {self.plan.total} samples "
                "of data.train: lower train.global_batch_size (or train.micro_batch_size)"
            )
        self.decoder, self.tokenizer, self.batch_size = decoder, tokenizer, batch_size
        self.chunk = chunk_size(batch_size)
        self.teacher_tokenizer = teacher_tokenizer  # batches then carry "teacher_text" too
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_bad_fraction, self.stall_timeout_s = max_bad_fraction, stall_timeout_s
        self.retries, self.retry_backoff_s, self.max_member_mb = retries, retry_backoff_s, max_member_mb
        self.positions = [(0, 0)] * self.plan.num_workers
        self.next_worker = 0
        self.errors: collections.Counter = collections.Counter()
        self.epoch_errors: collections.Counter = collections.Counter()  # "epoch/kind" -> count
        self.bad_urls: collections.Counter = collections.Counter()
        self.caption_sources: collections.Counter = collections.Counter()  # data.captions: samples per source
        self.samples_delivered = 0
        self.retried = 0  # transient remote read errors retried (not part of the data position)
        self._iter = None
        self._progress = None

    def _make_iter(self):
        # Each worker's (epoch, t, ...) for the stall message: shared memory, passed to workers by torch's pickler.
        self._progress = torch.zeros(4 * self.plan.num_workers, dtype=torch.float64)
        for w, (epoch, t) in enumerate(self.positions):
            self._progress[4 * w], self._progress[4 * w + 1] = epoch, t  # (segment, sample: set by the reader)
        if self.num_workers:
            self._progress.share_memory_()
        dataset = BatchStream(
            self.plan,
            self.decoder,
            self.tokenizer,
            self.chunk,
            list(self.positions),
            self.next_worker,
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
        batch = {"keys": [k for p in parts for k in p["keys"]], "epochs": [e for p in parts for e in p["epochs"]]}
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
        self.positions[worker] = tuple(batch["position"])
        self.next_worker = (worker + 1) % self.plan.num_workers
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
        slot = self.plan.rank * self.plan.num_workers + worker
        epoch, t, k, j = (int(x) for x in self._progress[4 * worker : 4 * worker + 4].tolist())
        segments = self.plan.span(worker, epoch)[0] if self.plan.sized else self.plan.segments(worker, epoch)
        where = f"reading {segments[k].url} at its sample {j}" if k < len(segments) else "at its span's end"
        return (
            f"no batch for data.stall_timeout_s={self.stall_timeout_s:g} s: loader slot {slot} (rank "
            f"{self.plan.rank}, worker {worker}) is at epoch {epoch}, position {t}, {where}; the storage may be "
            "unreachable or too slow (raise data.stall_timeout_s for slow storage)"
        )

    def _check_bad_fraction(self) -> None:
        bad = sum(self.errors.values())
        check_bad_fraction(bad, bad + self.samples_delivered, self.errors, self.bad_urls, self.max_bad_fraction)

    @property
    def epoch(self) -> float:
        """Fractional epochs this rank has consumed (mean over its slots); whole epochs when sizes are unknown
        and data.num_samples is not set."""
        span = self.plan.total / self.plan.num_slots if self.plan.total > 0 else float("inf")
        return sum(e + t / span for e, t in self.positions) / len(self.positions)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "mode": self.plan.mode,
            "seed": self.plan.seed,
            "world_size": self.plan.world_size,
            "num_workers": self.plan.num_workers,
            "num_shards": len(self.plan.shards),
            "total_samples": self.plan.total,
            "positions": [list(p) for p in self.positions],
            "next_worker": self.next_worker,
            "errors": dict(self.errors),
            "epoch_errors": dict(self.epoch_errors),
            "bad_urls": dict(self.bad_urls.most_common(100)),
            "caption_sources": dict(self.caption_sources),
            "samples_delivered": self.samples_delivered,
            "elastic": self.plan.elastic,
        }

    def errors_by_epoch(self) -> dict[str, dict[str, int]]:
        """``{epoch: {kind: count}}`` of this rank's skipped samples (complete for epochs the stream has left)."""
        out: dict[str, dict[str, int]] = {}
        for key, n in sorted(self.epoch_errors.items()):
            epoch, kind = key.split("/", 1)
            out.setdefault(epoch, {})[kind] = n
        return out

    def close(self, kill: bool = False) -> None:
        """Stops the worker processes now (``kill``: at once, for error and interrupt paths; see stop_workers)."""
        it, self._iter = self._iter, None
        stop_workers(it, kill)

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("version", "mode", "seed", "world_size", "num_workers", "num_shards", "total_samples"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data stream exactly: the checkpoint has {key}={state.get(key)!r}, this run "
                    f"{mine[key]!r}. Resume with the same data, seed, world size and data.num_workers, or start a "
                    f"new run directory"
                )
        self.positions = [tuple(p) for p in state["positions"]]
        self.next_worker = state["next_worker"]
        self.errors = collections.Counter(state["errors"])
        self.epoch_errors = collections.Counter(state.get("epoch_errors", {}))
        self.bad_urls = collections.Counter(state["bad_urls"])
        self.caption_sources = collections.Counter(state.get("caption_sources", {}))
        self.samples_delivered = state["samples_delivered"]
        self.plan.elastic = state.get("elastic")
        self._iter = None

    def load_elastic(self, states: list[dict]) -> str:
        """Resumes from the data states of every rank of a run with another layout (world size or workers).

        epoch mode: the epochs the old slots were in are re-planned from what they had not consumed
        (``StreamPlan.elastic_span``): every remaining sample once, none twice, in another order. resampled:
        new slots start a fresh draw (there is no exactly-once to keep). The skip counts so far go to rank 0.
        Returns a line for the log."""
        mine = self.state_dict()
        for key in ("version", "mode", "seed", "num_shards", "total_samples"):
            if any(st.get(key) != mine[key] for st in states):
                raise DataError(
                    f"cannot resume the data stream: the checkpoint has {key}={states[0].get(key)!r}, this run "
                    f"{mine[key]!r}. Resume with the same data and seed, or start a new run directory"
                )
        if not self.plan.sized:
            raise DataError(
                "shards of unknown size cannot be re-planned for another world size or data.num_workers: resume "
                "with the same layout, or add sizes.json beside the shards"
            )
        old = [tuple(p) for st in states for p in st["positions"]]  # slot = rank * workers + worker
        epochs = [e for e, _ in old]
        before = f"{states[0]['world_size']} rank(s) x {states[0]['num_workers']} worker(s)"
        after = f"{self.plan.world_size} x {self.plan.num_workers}"
        pending = states[0].get("elastic")
        if pending is not None and min(epochs) <= pending["last_epoch"]:
            raise DataError(
                f"the checkpoint is itself a re-planned resume still inside epoch {min(epochs)}: resume with its "
                f"layout ({before}) until that epoch ends, then change it"
            )
        if self.plan.mode == "resampled":
            self.positions = [(max(epochs) + 1, 0)] * self.plan.num_workers
            note = f"resampled stream: new draws for {after} slots (was {before})"
        else:
            self.plan.elastic = {
                "positions": [list(p) for p in old],
                "first_epoch": min(epochs),
                "last_epoch": max(epochs),
            }
            self.positions = [(min(epochs), 0)] * self.plan.num_workers
            note = (
                f"data stream re-planned from {before} to {after}: the samples not yet consumed in epoch(s) "
                f"{min(epochs)}-{max(epochs)} are shared out anew, each seen once; their order differs from an "
                "uninterrupted run"
            )
        self.next_worker = 0
        if self.plan.rank == 0:
            for st in states:
                self.errors.update(st["errors"])
                self.epoch_errors.update(st.get("epoch_errors", {}))
                self.bad_urls.update(st["bad_urls"])
                self.caption_sources.update(st.get("caption_sources", {}))
                self.samples_delivered += st["samples_delivered"]
        self._iter = None
        return note
