"""Cached embeddings of a locked image tower (``data.cache_image_features``, LiT's saving): computed once, before
the first step, and read by the loader instead of the images.

Layout, ``<data.feature_cache_dir>/<fingerprint>/``::

    cache.json        what the embeddings are of (model, digest of the image tower's weights, image size,
                      mean/std, precision, engine)
    <shard>.keys.npy  the keys of one shard's good samples, in tar order (<shard>: a digest of the shard's URL)
    <shard>.npy       their embeddings, float32, one row per key; written last, so a shard is done exactly when
                      this file exists (a killed build resumes at the shards not done)

The fingerprint is a digest of ``cache.json``: another tower, image size, precision or engine gets a folder of its
own, never stale embeddings. Augmentation is off (``data.crop_scale_min=1``, refused otherwise), so a sample's
pixels, hence its embedding, are the same every epoch; the embeddings are the tower's own outputs (normalised,
in the training forward's precision), so the loss is the uncached run's up to the rounding of another batch
composition.

``build`` (every rank, before training): rank r embeds the not-yet-done shards r, r + W, ... through the training
decoder and the image tower only, without gradient; a shard that cannot be read is left out (its samples then
count as ``uncached`` when training meets them). ``FeatureCache.lookup`` (in the loader workers): a shard's keys
and its memory-mapped rows, opened on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit import distributed
from clipkit.data import worker_context
from clipkit.data.loader import BadSample, worker_init
from clipkit.data.stream import Reader, ShardReadError, iter_shard

log = logging.getLogger("clipkit")
VERSION = 1
MAX_OPEN = 128  # shards a loader worker keeps open (a memory map each): more than the streams it reads at once


def shard_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:24]


def tower_digest(tower: torch.nn.Module) -> str:
    """A digest of a module's weights (names, dtypes, shapes and bytes), before any engine shards them."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(tower.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_for(root: Path, described: dict) -> Path:
    """The cache folder of the embeddings ``described`` (what ``cache.json`` holds)."""
    text = json.dumps({"version": VERSION, **described}, sort_keys=True)
    return Path(root) / hashlib.sha1(text.encode()).hexdigest()[:16]


class FeatureCache:
    """Reads a cache folder: ``lookup(sample)`` is the sample's embedding (a float32 vector), or None when the
    cache has none for it (its shard was not embedded, or the sample was bad then). Pickled into the loader
    workers as its folder alone; each worker opens the shards it meets."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._open: OrderedDict[str, tuple[dict, np.ndarray] | None] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def done(self, url: str) -> bool:
        return (self.folder / f"{shard_id(url)}.npy").is_file()

    def lookup(self, sample: dict) -> torch.Tensor | None:
        table = self._table(sample.get("__url__", ""))
        if table is None:
            return None
        row = table[0].get(sample["__key__"])
        return None if row is None else torch.from_numpy(np.array(table[1][row]))

    def _table(self, url: str) -> tuple[dict, np.ndarray] | None:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        table = None
        if self.done(url):
            sid = shard_id(url)
            keys = np.load(self.folder / f"{sid}.keys.npy").tolist()
            table = ({k: i for i, k in enumerate(keys)}, np.load(self.folder / f"{sid}.npy", mmap_mode="r"))
        self._open[url] = table
        if len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)
        return table

    def write(self, url: str, keys: list[str], rows: np.ndarray) -> None:
        """One shard's keys and rows, the rows last and each file under a temporary name first."""
        sid = shard_id(url)
        for suffix, array in ((".keys.npy", np.array(keys, dtype=str)), (".npy", rows.astype(np.float32))):
            path = self.folder / f"{sid}{suffix}"
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)


class ShardImages(IterableDataset):
    """The decoded images of some shards, in tar order, in batches: ``{"url", "keys", "image", "last"}`` (the last
    batch of a shard flagged, with its bad-sample count; an unreadable shard gives ``{"url", "failed"}``). Loader
    worker w of n takes shards w, w + n, ..."""

    def __init__(self, urls: list[str], decoder, batch_size: int, reader: Reader):
        self.urls, self.decoder, self.batch_size, self.reader = urls, decoder, batch_size, reader
        self.trainer_pid = os.getpid()  # (worker_init: the workers end with this process)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            keys, images, bad = [], [], 0
            try:
                for sample in iter_shard(url, self.reader):
                    try:
                        image, _ = self.decoder(sample, 0)  # (augmentation is off: every epoch's pixels)
                    except BadSample:
                        bad += 1
                        continue
                    keys.append(sample["__key__"])
                    images.append(image)
                    if len(images) == self.batch_size:
                        yield {"url": url, "keys": keys, "image": torch.stack(images), "last": False, "bad": 0}
                        keys, images = [], []
            except ShardReadError as err:
                yield {"url": url, "failed": str(err)}
                continue
            yield {"url": url, "keys": keys, "image": torch.stack(images) if images else None, "last": True, "bad": bad}


def build(
    cache: FeatureCache,
    urls: list[str],
    decoder,
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    workers: int,
    reader: Reader,
    worker_options: dict,
) -> dict:
    """Embeds this rank's shards of ``urls`` that ``cache`` lacks (``embed``: uint8 images -> the tower's
    embeddings); returns counts for the log and summary.json (this rank's)."""
    mine = [u for i, u in enumerate(urls) if i % world_size == rank]
    todo = [u for u in mine if not cache.done(u)]
    counts = {"shards": len(mine), "embedded": 0, "failed": 0, "samples": 0, "bad": 0, "seconds": 0.0}
    if not todo:
        return counts
    start = time.perf_counter()
    log.info("cached image features: embedding %d of this rank's %d shards into %s", len(todo), len(mine), cache.folder)
    workers = min(workers, len(todo))
    options = {**worker_options, "num_workers": workers} if workers else {"num_workers": 0}
    pending: dict[str, tuple[list, list]] = {}
    for batch in DataLoader(ShardImages(todo, decoder, batch_size, reader), batch_size=None, **options):
        url = batch["url"]
        if "failed" in batch:
            log.warning("cached image features: %s could not be read (%s); its samples will count as uncached",
                        url, batch["failed"])  # fmt: skip
            pending.pop(url, None)
            counts["failed"] += 1
            continue
        keys, rows = pending.setdefault(url, ([], []))
        if batch["image"] is not None:
            keys.extend(batch["keys"])
            rows.append(embed(batch["image"]).float().cpu().numpy())
        if batch["last"]:
            del pending[url]
            cache.write(url, keys, np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))
            counts["embedded"] += 1
            counts["samples"] += len(keys)
            counts["bad"] += batch["bad"]
    counts["seconds"] = round(time.perf_counter() - start, 3)
    return counts


def describe(cfg, tower: str, image_size: int, mean, std, amp_dtype) -> dict:
    """What the cached embeddings are of (``cache.json``); ``tower``: the image tower's ``tower_digest``."""
    return {
        "model": cfg.model.config or cfg.model.name,
        "image_tower": tower,
        "image_size": image_size,
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "precision": str(amp_dtype or torch.float32).replace("torch.", ""),
        "engine": cfg.parallel.engine if not cfg.parallel.is_deepspeed else f"zero{cfg.parallel.zero_stage}",
    }


def attach(cfg, env, engine, normalize: torch.nn.Module, loader, tower: str, image_size: int, mean, std) -> dict:
    """``data.cache_image_features``: builds what the cache lacks of the loader's shards (rank r its share; then,
    where a node's cache folder is not shared, each node's ranks what that node still lacks), and points the
    loader at it. Returns the totals over the ranks for summary.json."""
    described = describe(cfg, tower, image_size, mean, std, engine.amp_dtype)
    root = Path(os.path.expanduser(cfg.data.feature_cache_dir or os.path.join(cfg.data.cache_dir, "features")))
    cache = FeatureCache(folder_for(root, described))
    cache.folder.mkdir(parents=True, exist_ok=True)
    if env.local_rank == 0:
        (cache.folder / "cache.json").write_text(json.dumps({"version": VERSION, **described}, indent=1))

    def embed(images_u8: torch.Tensor) -> torch.Tensor:
        images = normalize(images_u8.to(env.device))
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(env.device.type, dtype=engine.amp_dtype) if engine.amp_dtype else contextlib.nullcontext()
        with torch.no_grad(), amp:
            return engine.model(images, None)["image_features"]

    urls = list(loader.plan.shards.urls)
    workers = max(0, cfg.data.workers())
    options = dict(prefetch_factor=cfg.data.prefetch_factor, worker_init_fn=worker_init,
                   multiprocessing_context=worker_context())  # fmt: skip
    reader = Reader(cfg.data.remote_retries, cfg.data.retry_backoff_s, cfg.data.max_member_mb << 20)
    args = dict(batch_size=cfg.train.micro_batch(env.world_size), workers=workers, reader=reader,
                worker_options=options)  # fmt: skip
    counts = [build(cache, urls, loader.decoder, embed, rank=env.rank, world_size=env.world_size, **args)]
    distributed.barrier()
    missing = [u for u in urls if not cache.done(u)]
    if missing and env.world_size > 1:  # a folder not shared between nodes (or a shard that failed): this node's
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks share what it lacks
        counts.append(build(cache, missing, loader.decoder, embed, rank=env.local_rank, world_size=local_world, **args))
    distributed.barrier()
    loader.use_features(cache)
    totals = {k: sum(c[k] for rank in distributed.all_gather_object(counts) for c in rank) for k in counts[0]}
    totals["shards"] = len(urls)
    totals["done"] = sum(cache.done(u) for u in urls)
    totals["seconds"] = round(max(c["seconds"] for c in counts), 3)
    totals["folder"] = str(cache.folder)
    return totals
