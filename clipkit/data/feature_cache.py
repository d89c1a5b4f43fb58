"""Cached embeddings of frozen towers (LiT's saving; MobileCLIP's stored teacher embeddings): computed once, before
the first step, and read by the loader in place of what the tower would have been given.

Four kinds, each switched on by its own field:

    image          a locked image tower (``data.cache_image_features``), one row per sample (its key)
    text           a locked text tower (``data.cache_text_features``), one row per distinct caption
    teacher_image  the distillation teacher's image tower (``data.cache_teacher_features``), one row per sample
    teacher_text   the teacher's text tower (the same switch), one row per distinct caption

A caption row covers every caption a sample may be given in any epoch (each item of a caption list, each source
of ``data.captions``), so the per-epoch choice of caption stays what it is without the cache. Image rows need the
same pixels every epoch: augmentation off (``data.crop_scale_min=1``, refused otherwise).

Layout, ``<data.feature_cache_dir>/<fingerprint>/`` for each kind::

    cache.json        what the embeddings are of (kind, model, digest of the tower's weights, image size,
                      mean/std or the tokens of probe captions, precision, engine, storage dtype)
    <shard>.keys.npy  the row ids of one shard, in tar order (<shard>: a digest of the shard's URL)
    <shard>.npy       their embeddings, one row per id, as ``data.feature_cache_dtype`` (float32 by default);
                      written last, so a shard is done exactly when this file exists (a killed build resumes at
                      the shards not done)

The fingerprint is a digest of ``cache.json``: another tower or setting gets a folder of its own, never stale rows.
The rows are the towers' own outputs (normalised, in the training forward's precision), so with float32 storage the
loss is the uncached run's up to the rounding of another batch composition.

``build`` (every rank, before training): rank r embeds the not-yet-done shards r, r + W, ... with the training
decoder and the one tower, without gradient; a shard that cannot be read is left out (its samples then count as
``uncached`` when training meets them). ``FeatureCache.lookup`` (in the loader workers): a shard's ids and its
memory-mapped rows, opened on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit import distributed, preempt
from clipkit.data import worker_context
from clipkit.data.feature_rows import IMAGE, TEACHER_IMAGE, TEACHER_TEXT, TEXT, FeatureCache, caption_id
from clipkit.data.loader import BadSample, DataError, stop_workers, worker_init
from clipkit.data.stream import Reader, ShardReadError, iter_shard
from clipkit.distill import PROBES  # (the captions whose tokens tell tokenizers apart, and context lengths)

log = logging.getLogger("clipkit")
VERSION = 1


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of weights (names, dtypes, shapes and bytes): taken before any engine shards them."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tower_digests(model: torch.nn.Module, kinds: list[str]) -> dict[str, str]:
    """The student towers' digests for the cached kinds among ``kinds`` (image: ``visual.*``; text: every weight
    but those and the temperature and bias)."""
    state = model.state_dict()
    image = {k: v for k, v in state.items() if k.startswith("visual.")}
    text = {k: v for k, v in state.items() if not k.startswith("visual.") and not k.startswith("logit_")}
    return {kind: weights_digest(image if kind == IMAGE else text) for kind in kinds if kind in (IMAGE, TEXT)}


def tokens_digest(tokenizer) -> str:
    return hashlib.sha1(b"".join(tokenizer([p]).numpy().tobytes() for p in PROBES)).hexdigest()[:16]


def folder_for(root: Path, described: dict) -> Path:
    """The cache folder of the embeddings ``described`` (what ``cache.json`` holds)."""
    text = json.dumps({"version": VERSION, **described}, sort_keys=True)
    return Path(root) / hashlib.sha1(text.encode()).hexdigest()[:16]


class ShardRows(IterableDataset):
    """What one kind's tower needs of some shards, in tar order, in batches: ``{"url", "ids", "images" (uint8, or
    None), "captions" (or None), "last", "bad"}``; the last batch of a shard is flagged and has its count of bad
    samples; an unreadable shard gives ``{"url", "failed"}``. Loader worker w of n takes shards w, w + n, ..."""

    def __init__(self, urls: list[str], decoder, kind: str, batch_size: int, reader: Reader):
        self.urls, self.decoder, self.kind, self.batch_size, self.reader = urls, decoder, kind, batch_size, reader
        self.trainer_pid = os.getpid()  # (worker_init: the workers end with this process)
        self.environ = dict(os.environ)  # (storage credentials set since the fork server started: see BatchStream)

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            os.environ.update(self.environ)
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            ids, images, captions, bad, seen = [], [], [], 0, set()
            try:
                for sample in iter_shard(url, self.reader):
                    rows = self._rows(sample)
                    if rows is None:
                        bad += 1
                        continue
                    for row_id, image, caption in (r for r in rows if r[0] not in seen):
                        seen.add(row_id)
                        ids.append(row_id)
                        images.append(image)
                        captions.append(caption)
                    if len(ids) >= self.batch_size:
                        yield self._batch(url, ids, images, captions, False, 0)
                        ids, images, captions = [], [], []
            except ShardReadError as err:
                yield {"url": url, "failed": str(err)}
                continue
            yield self._batch(url, ids, images, captions, True, bad)

    def _rows(self, sample: dict) -> list[tuple] | None:
        """(row id, image, caption) for each row the sample gives this kind; None: a bad sample."""
        if self.kind in (TEXT, TEACHER_TEXT):
            return [(caption_id(c), None, c) for c in self.decoder.candidates(sample)]
        try:
            image, _ = self.decoder(sample, 0)  # (augmentation is off: every epoch's pixels)
        except BadSample:
            return None
        return [(sample["__key__"], image, None)]

    def _batch(self, url: str, ids: list, images: list, captions: list, last: bool, bad: int) -> dict:
        text = self.kind in (TEXT, TEACHER_TEXT)
        return {
            "url": url,
            "ids": ids,
            "images": torch.stack(images) if ids and not text else None,
            "captions": captions if text else None,
            "last": last,
            "bad": bad,
        }


def build(
    cache: FeatureCache,
    urls: list[str],
    decoder,
    embed: Callable[[torch.Tensor | None, list[str] | None], torch.Tensor],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    workers: int,
    reader: Reader,
    worker_options: dict,
    stall_timeout_s: float = 0.0,
) -> dict:
    """Embeds this rank's shards of ``urls`` that ``cache`` lacks (``embed(uint8 images, captions)``: the tower's
    rows); returns counts for the log and summary.json (this rank's)."""
    mine = [u for i, u in enumerate(urls) if i % world_size == rank]
    todo = [u for u in mine if not cache.done(u)]
    counts = {"shards": len(mine), "embedded": 0, "failed": 0, "rows": 0, "bad": 0, "seconds": 0.0}
    if not todo:
        return counts
    start = time.perf_counter()
    log.info("cached %s features: embedding %d of this rank's %d shards into %s", cache.kind, len(todo), len(mine),
             cache.folder)  # fmt: skip
    workers = min(workers, len(todo))
    options = {**worker_options, "num_workers": workers} if workers else {"num_workers": 0}
    pending: dict[str, tuple[list, list]] = {}
    loader = DataLoader(ShardRows(todo, decoder, cache.kind, batch_size, reader), batch_size=None, **options)
    with contextlib.closing(_guarded(loader, stall_timeout_s, cache.kind)) as batches:
        for batch in batches:
            _take(cache, batch, pending, counts, embed)
    counts["seconds"] = round(time.perf_counter() - start, 3)
    return counts


def _take(cache: FeatureCache, batch: dict, pending: dict, counts: dict, embed) -> None:
    """One batch of the build: its rows embedded and kept until its shard's last batch, then written."""
    url = batch["url"]
    if "failed" in batch:
        log.warning("cached %s features: %s could not be read (%s); its samples will count as uncached",
                    cache.kind, url, batch["failed"])  # fmt: skip
        pending.pop(url, None)
        counts["failed"] += 1
        return
    ids, rows = pending.setdefault(url, ([], []))
    if batch["ids"]:
        ids.extend(batch["ids"])
        rows.append(embed(batch["images"], batch["captions"]).float().cpu().numpy())
    if batch["last"]:
        del pending[url]
        cache.write(url, ids, np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))
        counts["embedded"] += 1
        counts["rows"] += len(ids)
        counts["bad"] += batch["bad"]


def _guarded(loader: DataLoader, stall_timeout_s: float, kind: str):
    """The loader's batches; no batch for ``stall_timeout_s`` raises ``DataError``, and however the caller stops
    (an error, a signal, Ctrl-C) the workers are stopped with it (killed at once unless it ran to its end)."""
    it, ended = None, False
    try:
        with preempt.deferred():  # (starting workers: see TrainLoader._next_chunk)
            it = iter(loader)
        while True:
            try:
                with preempt.data_wait(stall_timeout_s):
                    batch = next(it)
            except StopIteration:
                ended = True
                return
            except preempt.DataStall:
                raise DataError(
                    f"cached {kind} features: no batch for data.stall_timeout_s={stall_timeout_s:g} s while "
                    "embedding; the storage may be unreachable or too slow (the shards done so far are kept)"
                ) from None
            yield batch
    finally:
        stop_workers(it, kill=not ended)


class CachedTeacher:
    """The teacher's outputs from cached rows: ``teacher(images, text, rows)`` (rows: its image embedding, then its
    text embedding, of one width, as the loader joins them in the batch's ``teacher_text``) -> what
    ``distill.Teacher`` gives. Keeps the teacher's temperature, not its model."""

    def __init__(self, logit_scale: torch.Tensor, described: str):
        self.logit_scale, self.described = logit_scale, described

    @classmethod
    def of(cls, teacher) -> CachedTeacher:
        with torch.no_grad():  # (as open_clip's forward returns it, in the teacher's precision)
            scale = teacher.model.logit_scale.exp().float().reshape(())
        return cls(scale, teacher.describe() + "; its embeddings cached")

    def describe(self) -> str:
        return self.described

    def __call__(self, images: torch.Tensor, text: torch.Tensor, rows: torch.Tensor) -> dict:
        width = rows.shape[1] // 2
        return {"image_features": rows[:, :width], "text_features": rows[:, width:], "logit_scale": self.logit_scale}


def kinds_of(cfg) -> list[str]:
    """The kinds the config caches."""
    data = cfg.data
    teacher = [TEACHER_IMAGE, TEACHER_TEXT] if data.cache_teacher_features else []
    return [*([IMAGE] if data.cache_image_features else []), *([TEXT] if data.cache_text_features else []), *teacher]


def attach(cfg, env, engine, built, normalize: torch.nn.Module, loader, digests: dict, teacher=None) -> dict:
    """Builds what each cached kind lacks of the loader's shards (rank r its share; then, where a node's cache
    folder is not shared, each node's ranks what that node still lacks) and points the loader's decoder at the
    caches. Returns, per kind, the totals over the ranks for summary.json."""
    amp = engine.amp_dtype

    def autocast():
        return torch.autocast(env.device.type, dtype=amp) if amp else contextlib.nullcontext()

    def pixels(images_u8: torch.Tensor) -> torch.Tensor:
        images = normalize(images_u8.to(env.device))
        return images.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else images

    def tokens(tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions).to(env.device)

    student = student_settings(cfg, amp)
    teacher_digest = weights_digest(teacher.model.state_dict()) if cfg.data.cache_teacher_features else None
    kinds = {}
    for kind in kinds_of(cfg):
        if kind == IMAGE:
            about = {**student, "tower": digests[IMAGE], "image_size": built.image_size,
                     "mean": list(built.mean), "std": list(built.std)}  # fmt: skip

            def embed(images, captions):
                with torch.no_grad(), autocast():
                    return engine.model(pixels(images), None)["image_features"]
        elif kind == TEXT:
            about = {**student, "tower": digests[TEXT], "tokens": tokens_digest(built.tokenizer)}

            def embed(images, captions):
                with torch.no_grad(), autocast():
                    return engine.model(None, tokens(built.tokenizer, captions))["text_features"]
        else:
            own = teacher.built
            about = {"model": own.name, "tower": teacher_digest, "precision": str(teacher.dtype).replace("torch.", "")}
            if kind == TEACHER_IMAGE:
                about.update(image_size=own.image_size, mean=list(own.mean), std=list(own.std),
                             student_image=[built.image_size, list(built.mean), list(built.std)])  # fmt: skip
            else:
                about["tokens"] = tokens_digest(teacher.tokenizer or built.tokenizer)

            def embed(images, captions, kind=kind):
                with torch.no_grad():
                    if kind == TEACHER_IMAGE:
                        return teacher.model(teacher.images(pixels(images)).to(teacher.dtype), None)["image_features"]
                    return teacher.model(None, tokens(teacher.tokenizer or built.tokenizer, captions))["text_features"]

        about["dtype"] = str(cfg.data.feature_cache_dtype)  # (stored as; rows are computed in the forward's)
        cache = FeatureCache(folder_for(_root(cfg), {"kind": kind, **about}), kind, about["dtype"])
        kinds[kind] = (cache, about, embed)

    totals = {}
    for kind, (cache, about, embed) in kinds.items():
        totals[kind] = _build_everywhere(cfg, env, loader, cache, about, embed)
    loader.use_features({kind: cache for kind, (cache, _, _) in kinds.items()})
    return totals


def student_settings(cfg, amp_dtype: torch.dtype | None) -> dict:
    """What, besides a student tower's weights, shapes its rows: the model, the forward's precision, the engine."""
    precision = str(amp_dtype or torch.float32).removeprefix("torch.")
    return {"model": cfg.model.config or cfg.model.name, "precision": precision, "engine": str(cfg.parallel.engine)}


def _root(cfg) -> Path:
    return Path(os.path.expanduser(cfg.data.feature_cache_dir or os.path.join(cfg.data.cache_dir, "features")))


def _build_everywhere(cfg, env, loader, cache: FeatureCache, about: dict, embed) -> dict:
    cache.folder.mkdir(parents=True, exist_ok=True)
    if env.local_rank == 0:
        described = {"version": VERSION, "kind": cache.kind, **about}
        (cache.folder / "cache.json").write_text(json.dumps(described, indent=1))
    urls = list(loader.plan.shards.urls)
    options = dict(prefetch_factor=cfg.data.prefetch_factor, worker_init_fn=worker_init,
                   multiprocessing_context=worker_context())  # fmt: skip
    reader = Reader(cfg.data.remote_retries, cfg.data.retry_backoff_s, cfg.data.max_member_mb << 20)
    args = dict(batch_size=cfg.train.micro_batch(env.world_size), workers=max(0, cfg.data.workers()),
                reader=reader, worker_options=options, stall_timeout_s=cfg.data.stall_timeout_s)  # fmt: skip
    decoder = loader.decoder
    counts = [build(cache, urls, decoder, embed, rank=env.rank, world_size=env.world_size, **args)]
    distributed.barrier()
    missing = [u for u in urls if not cache.done(u)]
    if missing and env.world_size > 1:  # a folder not shared between nodes (or a shard that failed): this node's
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks share what it lacks
        counts.append(build(cache, missing, decoder, embed, rank=env.local_rank, world_size=local_world, **args))
    distributed.barrier()
    totals = {k: sum(c[k] for rank in distributed.all_gather_object(counts) for c in rank) for k in counts[0]}
    totals.update(shards=len(urls), done=sum(cache.done(u) for u in urls), folder=str(cache.folder))
    totals["gb"] = round(cache.nbytes(urls) / 1e9, 6)
    totals["seconds"] = round(max(c["seconds"] for c in counts), 3)
    return totals
