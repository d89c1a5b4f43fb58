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
import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.data import transforms
from clipkit.data.shards import ShardSpecError, announced_size, expand_spec, local_path, shard_size
from clipkit.data.stream import MISSING, Shard, StreamPlan, iter_slot
from clipkit.preempt import ignore_in_worker

log = logging.getLogger("clipkit")
STATE_VERSION = 1


class BadSample(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class DataError(RuntimeError):
    """Unusable training data (too many bad samples, unknown sizes, resume with another layout)."""


@dataclass
class SampleDecoder:
    """Raw tar sample -> (uint8 CHW image, caption); raises ``BadSample(kind)``. Seeded per (seed, epoch, key)."""

    image_keys: tuple[str, ...]
    caption_key: str
    image_size: int
    crop_scale: tuple[float, float]
    seed: int

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, str]:
        rng = random.Random(f"{self.seed}/{epoch}/{sample.get('__url__')}/{sample['__key__']}")
        caption = self.caption(sample, rng)
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise BadSample("no_image")
        try:
            image = transforms.train_image(data, self.image_size, self.crop_scale, rng)
        except Exception:
            raise BadSample("bad_image") from None
        return image, caption

    def caption(self, sample: dict, rng: random.Random) -> str:
        member, _, field = self.caption_key.partition(":")
        if member not in sample:
            raise BadSample("no_caption")
        value = sample[member]
        if field:
            try:
                value = json.loads(value).get(field)
            except Exception:
                raise BadSample("bad_caption") from None
            if isinstance(value, list):
                value = rng.choice(value) if value else None
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise BadSample("no_caption")
        if not value.strip():
            raise BadSample("empty_caption")
        return value


def decoded(plan: StreamPlan, decoder: SampleDecoder, worker: int, epoch: int, t: int):
    """A slot's stream from (epoch, t), decoded: yields ``(epoch, t, item, url)`` where item is
    ``(image, caption, key)`` or a ``BadSample`` (counted by the caller, never raised)."""
    for e, pos, sample in iter_slot(plan, worker, epoch, t, on_error=lambda exn: None):
        url = sample.get("__url__", "?")
        try:
            if sample.get("__missing__"):
                raise BadSample(MISSING)
            image, caption = decoder(sample, e)
            yield e, pos, (image, caption, sample["__key__"]), url
        except BadSample as bad:
            yield e, pos, bad, url


class BatchStream(IterableDataset):
    """Yields micro-batches of one slot per DataLoader worker (or of slot 0 in-process)."""

    def __init__(
        self,
        plan: StreamPlan,
        decoder: SampleDecoder,
        tokenizer,
        batch_size: int,
        positions: list[tuple[int, int]],
        worker_offset: int,
    ):
        self.plan, self.decoder, self.tokenizer, self.batch_size = plan, decoder, tokenizer, batch_size
        self.positions, self.worker_offset = positions, worker_offset

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.worker_offset) % self.plan.num_workers
        errors: collections.Counter = collections.Counter()
        bad_urls: collections.Counter = collections.Counter()
        epoch_errors: collections.Counter = collections.Counter()  # "epoch/kind" -> count
        images, captions, keys, epochs = [], [], [], []
        for epoch, t, item, url in decoded(self.plan, self.decoder, worker, *self.positions[worker]):
            if isinstance(item, BadSample):
                errors[item.kind] += 1
                epoch_errors[f"{epoch}/{item.kind}"] += 1
                bad_urls[url] += 1
                continue
            images.append(item[0])
            captions.append(item[1])
            keys.append(item[2])
            epochs.append(epoch)
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "text": self.tokenizer(captions),
                    "keys": keys,
                    "epochs": epochs,
                    "worker": worker,
                    "position": (epoch, t + 1),
                    "errors": dict(errors),
                    "epoch_errors": dict(epoch_errors),
                    "bad_urls": dict(bad_urls),
                }
                images, captions, keys, epochs = [], [], [], []
                errors, bad_urls, epoch_errors = collections.Counter(), collections.Counter(), collections.Counter()


def resolve_shards(
    spec: str, num_samples: int = 0, allow_pipe: bool = True, allow_missing: bool = False
) -> tuple[list[Shard], list[float]]:
    """Shards with their sample counts. ``allow_missing``: an absent local shard is kept with its announced
    size (sizes.json; else 0), so the stream counts its samples as ``missing``; a warning names it."""
    sources = expand_spec(spec, check_exists=not allow_missing, allow_pipe=allow_pipe)
    shards, unknown = [], []
    for i, src in enumerate(sources):
        for url in src.urls:
            if allow_missing and not url.startswith("pipe:") and not local_path(url).is_file():
                n = announced_size(url)
                log.warning("shard missing: %s (%d announced samples will count as missing)", url, n)
                shards.append(Shard(url, n, i))
                continue
            n = shard_size(url)
            if n is None:
                unknown.append(url)
            shards.append(Shard(url, n or 0, i))
    if unknown:
        if num_samples <= 0:
            raise ShardSpecError(
                f"sample count unknown for {len(unknown)} shard(s), e.g. {unknown[0]}: add sizes.json "
                "or _stats.json beside them, or set data.num_samples"
            )
        per = num_samples // len(shards)
        shards = [Shard(s.url, per, s.source) for s in shards]
    return shards, [s.weight for s in sources]


class TrainLoader:
    """Iterator of training micro-batches for this rank, with exact ``state_dict`` / ``load_state_dict``."""

    def __init__(
        self,
        shards: list[Shard],
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
    ):
        self.plan = StreamPlan(shards, source_weights, mode, seed, rank, world_size, num_workers, window)
        if self.plan.total < self.plan.num_slots:
            raise DataError(f"{self.plan.total} samples cannot feed {self.plan.num_slots} (ranks x workers) streams")
        self.decoder, self.tokenizer, self.batch_size = decoder, tokenizer, batch_size
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_bad_fraction = max_bad_fraction
        self.positions = [(0, 0)] * self.plan.num_workers
        self.next_worker = 0
        self.errors: collections.Counter = collections.Counter()
        self.epoch_errors: collections.Counter = collections.Counter()  # "epoch/kind" -> count
        self.bad_urls: collections.Counter = collections.Counter()
        self.samples_delivered = 0
        self._iter = None

    def _make_iter(self):
        dataset = BatchStream(
            self.plan, self.decoder, self.tokenizer, self.batch_size, list(self.positions), self.next_worker
        )
        kwargs = dict(num_workers=self.num_workers, batch_size=None, pin_memory=self.pin_memory)
        if self.num_workers:
            kwargs.update(
                prefetch_factor=self.prefetch_factor, persistent_workers=False, worker_init_fn=ignore_in_worker
            )
        return iter(DataLoader(dataset, **kwargs))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        worker = batch["worker"]
        assert worker == self.next_worker, "DataLoader delivered batches out of order"
        self.positions[worker] = tuple(batch["position"])
        self.next_worker = (worker + 1) % self.plan.num_workers
        self.errors.update(batch["errors"])
        self.epoch_errors.update(batch["epoch_errors"])
        self.bad_urls.update(batch["bad_urls"])
        self.samples_delivered += len(batch["keys"])
        self._check_bad_fraction()
        return batch

    def _check_bad_fraction(self) -> None:
        bad = sum(self.errors.values())
        seen = bad + self.samples_delivered
        if seen >= 1000 and bad > self.max_bad_fraction * seen:
            worst = ", ".join(f"{u} ({n})" for u, n in self.bad_urls.most_common(3))
            raise DataError(
                f"{bad} of {seen} samples were bad ({dict(self.errors)}), above data.max_bad_fraction="
                f"{self.max_bad_fraction}; worst shards: {worst or 'n/a'}"
            )

    @property
    def epoch(self) -> float:
        """Fractional epochs this rank has consumed (mean over its slots)."""
        span = self.plan.total / self.plan.num_slots
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
            "samples_delivered": self.samples_delivered,
        }

    def errors_by_epoch(self) -> dict[str, dict[str, int]]:
        """``{epoch: {kind: count}}`` of this rank's skipped samples (complete for epochs the stream has left)."""
        out: dict[str, dict[str, int]] = {}
        for key, n in sorted(self.epoch_errors.items()):
            epoch, kind = key.split("/", 1)
            out.setdefault(epoch, {})[kind] = n
        return out

    def close(self) -> None:
        """Stops the worker processes now (they ignore SIGTERM, so they must not be left to interpreter exit)."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's graceful path: done event, join
        if shutdown is not None:
            shutdown()

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
        self.samples_delivered = state["samples_delivered"]
        self._iter = None
