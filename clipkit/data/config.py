"""The data component's config: the training stream (``data.*``) and the embedded demo data (``data.demo.*``)."""

from __future__ import annotations

import math
import os
import tarfile
from dataclasses import dataclass, field

from clipkit.data import remote
from clipkit.errors import PATH, RESUMABLE, Choice, ConfigError, at_most, non_negative, positive, require


class CacheDtype(Choice):
    float32 = "float32"  # the tower's rows as computed: training equals the uncached run
    float16 = "float16"  # half the disk; rows are unit vectors, rounded to about 1e-3 of their length


class Mode(Choice):
    epoch = "epoch"  # each sample once per epoch
    resampled = "resampled"  # shards drawn with replacement, forever


@dataclass
class DemoDataConfig:
    # Seed of the demo world: which scenes, colours and captions are drawn.
    seed: int = 0
    # Side of the generated demo images in pixels (the model's crop is taken from them).
    image_size: int = 40
    # Training pairs generated.
    num_train: int = 24000
    # Held-out zero-shot images (36 colour-shape classes, prompts never seen in training).
    num_zeroshot: int = 1800
    # Held-out retrieval images, each with several captions.
    num_retrieval: int = 1000
    # Samples per generated tar shard.
    shard_size: int = 2000
    # Captions per training image (one is drawn per use).
    num_captions: int = 4

    def validate(self, prefix: str = "data.demo") -> None:
        positive(prefix, self, "image_size", "num_train", "shard_size", "num_captions")
        non_negative(prefix, self, "num_zeroshot", "num_retrieval")


MAX_AUTO_WORKERS = 32  # (num_workers=-1 never asks for more loader processes per rank)
AUTO_STREAMS = 64  # (data.streams=0 never picks more: one loader worker may read that many shards at once)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(streams: int, global_batch: int, world_size: int, workers: int) -> tuple[str, str] | None:
    """(field, message) when ``world_size`` ranks x ``workers`` loader workers cannot read ``streams`` canonical
    streams into global batches of ``global_batch`` (each rank and worker must read as many streams, and every
    stream gives as many samples to each batch); None when the layout is admitted."""
    if global_batch % streams:
        fits = [d for d in divisors(global_batch) if d % world_size == 0 and d <= 4 * AUTO_STREAMS * world_size]
        return "data.streams", (
            f"must divide train.global_batch_size={global_batch} (every stream gives as many samples to each "
            f"batch); with {world_size} rank(s): one of {fits[:12]}"
        )
    if streams % world_size:
        return "data.streams", (
            f"data.streams={streams} cannot be shared by {world_size} ranks: world sizes it admits are "
            f"{divisors(streams)}; set data.streams to a multiple of {world_size} that divides "
            f"train.global_batch_size={global_batch} (and keep it: it fixes the order of samples)"
        )
    per_rank = streams // world_size
    if per_rank % max(1, workers):
        return "data.num_workers", (
            f"{workers} loader workers per rank cannot share this rank's {per_rank} of data.streams={streams} "
            f"streams: use one of {divisors(per_rank)} (or -1 to pick the largest the host allows)"
        )
    return None


@dataclass
class DataConfig:
    # Shard spec (``/data/{00000..00099}.tar``) or ``demo`` for the embedded demo data.
    train: str = field(default="demo", metadata=PATH)
    # `epoch`: every sample exactly once per epoch, resumable to the sample; `resampled`: shards drawn with replacement.
    mode: Mode = Mode.epoch
    # Loader worker processes per rank (0 = decode in the training process). -1 (default): what the host offers
    # per local rank (its CPUs / local ranks, one left to the training process; at most 32), and 1 for the
    # embedded demo (its 40 px images need no more). See ``workers()``.
    num_workers: int = field(default=-1, metadata=RESUMABLE)
    # Window of the seeded sample shuffle (samples, shared by the streams a worker reads); 0 keeps tar order.
    shuffle_window: int = 1000
    # Canonical streams the data is read as (see docs/data.md): the order of samples, and so every global batch,
    # depends on this number, never on the world size or data.num_workers. A layout (ranks x workers) is admitted
    # when ranks x workers divides it; it must divide train.global_batch_size. 0 (default): the divisor of
    # train.global_batch_size up to 64 that admits the most layouts. Keep it to resume on another layout.
    streams: int = 0
    # Image members tried in order, separated by ``;``.
    image_key: str = "jpg;png;webp;jpeg"
    # ``auto``: a ``txt`` member, else the ``json`` member's ``caption`` (img2dataset), else its ``captions``;
    # or a member (``txt``), or ``json:FIELD`` (a list gives one seeded pick per use).
    caption_key: str = "auto"
    # Several caption sources mixed (instead of caption_key): ``[txt@0.3,json:recaption@0.7]``, each a member or
    # json:FIELD with an optional @probability (default 1, normalised). One is drawn per sample and epoch from the
    # seed among those the sample has; summary.json counts the samples trained with each (caption_sources).
    captions: list[str] = field(default_factory=list)
    # Shards whose size nothing announces (pipe:, no sizes.json / _stats.json) are read to their end; this
    # total only sets the epoch fraction shown in logs (0 = whole epochs).
    num_samples: int = 0
    # Above this fraction of bad samples (undecodable, no caption, lost to a broken tar) the run stops.
    max_bad_fraction: float = field(default=0.1, metadata=RESUMABLE)
    # False refuses ``pipe:`` shard URLs (shell commands): set it when running configs you did not write.
    allow_pipe: bool = True
    # A shard of the spec that does not exist: refused up front (False), or, when True, warned about and its
    # announced samples (sizes.json) counted as ``missing`` while the run goes on.
    allow_missing_shards: bool = False
    # Keep this fraction of the training shards out of training (every round(1/f)-th shard, spread over the
    # spec) and evaluate retrieval on them (eval.retrieval.dataset=auto or holdout); 0 = train on every shard.
    holdout_fraction: float = 0.0
    # No batch for this long (seconds) stops the run, naming the stream, shard and position it was reading; 0 = off.
    stall_timeout_s: float = field(default=300.0, metadata=RESUMABLE)
    # Remote shards: transient errors (connection reset, timeout, HTTP 5xx) retried per shard, with exponential
    # backoff from retry_backoff_s; a shard that keeps failing counts its remaining samples as missing.
    remote_retries: int = field(default=5, metadata=RESUMABLE)
    # (first backoff of those retries, doubled each time)
    retry_backoff_s: float = field(default=1.0, metadata=RESUMABLE)
    # A tar member larger than this (MiB, decompressed: .tar.gz / .tar.bz2 / .tar.xz shards are decompressed as
    # they stream) ends that shard's read: the rest of the shard counts as missing, and memory stays bounded.
    # 0 = no bound.
    max_member_mb: int = field(default=256, metadata=RESUMABLE)
    # Random-resized-crop area range, as fractions of the image (1, 1 = no crop: the whole image, centre-cropped
    # to an aspect ratio within 3/4..4/3, the same every epoch).
    crop_scale_min: float = 0.9
    # (upper end of that range)
    crop_scale_max: float = 1.0
    # A locked image tower (model.lock_image=true): its embeddings of the training images are computed once,
    # before the first step, into data.feature_cache_dir, and training reads them instead of the images (no
    # decoding, no image-tower forward per step). Needs augmentation off (data.crop_scale_min=1).
    cache_image_features: bool = field(default=False, metadata=RESUMABLE)
    # The same for a locked text tower (model.lock_text=true): one embedding per distinct caption, covering every
    # caption a sample may be given (each item of a list, each source of data.captions).
    cache_text_features: bool = field(default=False, metadata=RESUMABLE)
    # The same for the distillation teacher (distill.teacher): its image and text embeddings, computed once; the
    # teacher then runs no forward while training. Needs augmentation off (data.crop_scale_min=1).
    cache_teacher_features: bool = field(default=False, metadata=RESUMABLE)
    # Where cached tower features are kept ("" = <data.cache_dir>/features): one folder per tower (its weights),
    # preprocessing and precision, one file per shard; a later run with the same tower reuses them.
    feature_cache_dir: str = field(default="", metadata=PATH)
    # How cached rows are stored: float32 (training equals the uncached run) or float16 (half the disk: 1.5 KB
    # per sample for a 768-wide embedding instead of 3 KB; rows rounded to about 1e-3).
    feature_cache_dtype: CacheDtype = CacheDtype.float32
    # Batches each worker prepares ahead.
    prefetch_factor: int = field(default=4, metadata=RESUMABLE)
    # Where the demo data is generated and cached.
    cache_dir: str = field(default="${oc.env:CLIPKIT_CACHE,'~/.cache/clipkit'}", metadata=PATH)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)

    def workers(self, rank_streams: int = 0) -> int:
        """``num_workers`` with -1 resolved for this process: the CPUs it may use (its affinity), shared by the
        ranks of this node when that is the whole machine (torchrun's ``LOCAL_WORLD_SIZE``, SLURM's tasks per
        node), less one for the training process itself; with ``rank_streams`` (the canonical streams of one
        rank), the largest count up to that which divides it (each worker reads as many streams)."""
        if self.num_workers >= 0:
            return self.num_workers
        if self.train == "demo":
            return 1
        cpus = self._host_workers()
        return max(d for d in range(1, cpus + 1) if rank_streams % d == 0) if rank_streams else cpus

    def stream_count(self, global_batch: int) -> int:
        """``streams``, or (0) the divisor of ``global_batch`` up to ``AUTO_STREAMS`` with the most divisors (the
        most layouts it admits), the larger on a tie: 64 for 128, 48 for 96, 40 for 1000."""
        if self.streams:
            return self.streams
        fits = [d for d in range(1, AUTO_STREAMS + 1) if global_batch % d == 0]
        return max(fits, key=lambda d: (len(divisors(d)), d))

    def _host_workers(self) -> int:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if cpus == (os.cpu_count() or cpus):  # not bound to a share of the node: split it between the local ranks
            local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1")
            cpus //= max(1, int(local.split("(")[0].split(",")[0] or 1))
        return max(1, min(MAX_AUTO_WORKERS, cpus - 1))

    def caption_mix(self) -> tuple[tuple[str, float], ...]:
        """``captions`` as ((source, probability), ...), the probabilities summing to 1 (() when not set)."""
        pairs = [(source, float(weight)) for source, weight in map(caption_source, self.captions)]
        total = sum(w for _, w in pairs)
        return tuple((s, w / total) for s, w in pairs)

    def validate(self, check_shards: bool, prefix: str = "data") -> None:
        """Own fields; with ``check_shards`` (training reads ``train``) the shard spec is expanded and probed."""
        positive(prefix, self, "prefetch_factor")
        if self.num_workers < -1:
            raise ConfigError(f"{prefix}.num_workers", self.num_workers, "must be >= 0, or -1 for the host's CPUs")
        non_negative(prefix, self, "shuffle_window", "num_samples", "stall_timeout_s", "remote_retries")
        non_negative(prefix, self, "max_member_mb", "streams")
        at_most(prefix, self, "streams", 65536, "canonical streams (as many as the loader slots of the largest run)")
        at_most(prefix, self, "prefetch_factor", 64, "batches each loader worker keeps ready (shared memory)")
        at_most(prefix, self, "shuffle_window", 1_000_000, "samples the reader holds in memory to shuffle")
        at_most(prefix, self, "remote_retries", 100, "attempts per shard before it counts as missing")
        at_most(prefix, self, "max_member_mb", 65536, "MiB one tar member may take in a loader worker's memory")
        non_negative(prefix, self, "retry_backoff_s")
        require(
            f"{prefix}.max_bad_fraction", self.max_bad_fraction, 0 <= self.max_bad_fraction <= 1, "must be in [0, 1]"
        )
        require(
            f"{prefix}.crop_scale_min",
            self.crop_scale_min,
            0 < self.crop_scale_min <= self.crop_scale_max <= 1,
            "need 0 < crop_scale_min <= crop_scale_max <= 1",
        )
        require(
            f"{prefix}.holdout_fraction", self.holdout_fraction, 0 <= self.holdout_fraction < 1, "must be in [0, 1)"
        )
        self._validate_captions(f"{prefix}.captions")
        self.demo.validate(f"{prefix}.demo")
        if not check_shards:
            return
        sources = check_shard_spec(
            f"{prefix}.train", self.train, allow_pipe=self.allow_pipe, check_exists=not self.allow_missing_shards
        )
        if self.holdout_fraction > 0:
            every = holdout_every(self.holdout_fraction)
            count = sum(len(s.urls) for s in sources)
            if self.train == "demo":
                raise ConfigError(
                    f"{prefix}.holdout_fraction",
                    self.holdout_fraction,
                    "the demo has its own held-out splits; hold out a fraction of your own shards (data.train=...)",
                )
            if count // every == 0 or count // every == count:
                raise ConfigError(
                    f"{prefix}.holdout_fraction",
                    self.holdout_fraction,
                    f"holds out every {every}th shard, none of the {count} shard(s) of data.train: use a larger "
                    "fraction or more shards (whole shards are held out, so the split is exact and resumable)",
                )
        if self.mode == Mode.epoch and any(s.weight != 1.0 for s in sources):
            raise ConfigError(
                f"{prefix}.train",
                self.train,
                "source weights (@W) need data.mode=resampled; an epoch visits every sample exactly once",
            )

    def _validate_captions(self, key: str) -> None:
        if not self.captions:
            return
        if self.caption_key != "auto":
            raise ConfigError(
                key, list(self.captions), f"replaces data.caption_key={self.caption_key}: set one of them"
            )
        seen = set()
        for entry in self.captions:
            source, weight = caption_source(entry)
            member, _, field = source.partition(":")
            if not member or (":" in source and not field) or any(c in source for c in " ;,"):
                raise ConfigError(key, entry, "a caption source is a member (txt) or json:FIELD, then @probability")
            try:
                ok = math.isfinite(float(weight)) and float(weight) > 0
            except ValueError:
                ok = False
            require(key, entry, ok, "the probability after @ must be a positive number")
            require(key, entry, source not in seen, "names a caption source twice")
            seen.add(source)


def caption_source(entry) -> tuple[str, str]:
    """A ``data.captions`` entry ``SOURCE@P`` as (source, probability as written; "1" without ``@``)."""
    source, at, weight = str(entry).rpartition("@")
    return (source, weight) if at else (weight, "1")


def holdout_every(fraction: float) -> int:
    """``data.holdout_fraction`` as "every N-th shard"."""
    return max(1, round(1 / fraction))


def check_shard_spec(
    key: str, spec: str, allow_empty: bool = False, allow_pipe: bool = True, check_exists: bool = True
) -> list:
    """The sources of shard spec ``spec`` (``key`` names it in the error); ``demo`` has none."""
    if spec == "demo" or (allow_empty and spec == ""):
        return []
    from clipkit.data.shards import ShardSpecError, expand_spec

    try:
        sources = expand_spec(spec, check_exists=check_exists, allow_pipe=allow_pipe)
    except ShardSpecError as err:
        raise ConfigError(key, spec, str(err)) from None
    _probe_first_shard(key, spec, sources)
    return sources


def _probe_first_shard(key: str, spec: str, sources: list) -> None:
    """The first local shard of the spec is a tar (one header read: ``/etc/passwd`` or a folder is named here,
    not deep in the loader; the others are checked as they are read)."""
    first = next((u for src in sources for u in src.urls), None)
    if first is None or remote.is_remote(first) or remote.is_pipe(first):
        return
    path = remote.local_path(first)
    if path.is_dir():
        raise ConfigError(key, spec, f"{path} is a folder: name its shards, e.g. {path}/*.tar")
    if path.is_file() and path.stat().st_size > 0 and not tarfile.is_tarfile(path):
        raise ConfigError(key, spec, f"{path} is not a tar file (webdataset shards are .tar files)")
