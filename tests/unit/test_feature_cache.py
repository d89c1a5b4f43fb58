"""Cached image features (``data.cache_image_features``): the build embeds each shard once (rank r its share, bad
samples left out and counted, an unreadable shard left for training to count), the cache hands back exactly the
rows written, the training decoder reads them instead of decoding, and a full-image crop is the same every epoch.
Training with the cache against training without it: tests/integration/test_locked_towers.py."""

from __future__ import annotations

import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from clipkit import config as config_lib
from clipkit.config import RootConfig
from clipkit.data import feature_cache
from clipkit.data.feature_cache import FeatureCache
from clipkit.data.loader import BadSample, SampleDecoder
from clipkit.data.stream import Reader, iter_shard
from clipkit.data.transforms import random_resized_crop_box
from clipkit.errors import ConfigError
from tests.shardsets import _add, jpeg

BROKEN = b"<html>not an image</html>"


def _shards(root: Path, count: int = 3, per_shard: int = 5, broken: tuple[str, ...] = ()) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(count):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:02d}{i:03d}"
                _add(tar, f"{key}.jpg", BROKEN if key in broken else jpeg((40 * i, 90, 200 - 30 * s), seed=s * 10 + i))
                _add(tar, f"{key}.txt", f"caption {key}".encode())
        urls.append(str(path))
    return urls


def _decoder(**kw) -> SampleDecoder:
    return SampleDecoder(("jpg",), "txt", 16, (1.0, 1.0), 0, **kw)


def _mean_colour(images_u8: torch.Tensor) -> torch.Tensor:
    """A stand-in tower: each image's mean colour (a function of the pixels alone, like a tower in eval mode)."""
    return images_u8.float().mean(dim=(2, 3))


def _build(cache, urls, rank=0, world_size=1):
    return feature_cache.build(cache, urls, _decoder(), _mean_colour, rank=rank, world_size=world_size,
                               batch_size=2, workers=0, reader=Reader(retries=0), worker_options={})  # fmt: skip


def test_build_embeds_each_shard_once_and_the_cache_gives_back_those_rows(tmp_path):
    urls = _shards(tmp_path / "data", broken=("01002",))
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    first = _build(cache, urls, rank=1, world_size=2)  # rank 1 of 2: the shards 1, 3, ... only
    assert (first["shards"], first["embedded"], first["samples"], first["bad"]) == (1, 1, 4, 1)
    assert [cache.done(u) for u in urls] == [False, True, False]
    rest = _build(cache, urls)  # then rank 0 of 1: what is left, never a shard twice
    assert (rest["embedded"], rest["samples"]) == (2, 10)
    assert _build(cache, urls)["embedded"] == 0  # a later run reuses every shard

    expected = {}  # what the tower gives each good sample, decoded one by one
    for url in urls:
        for sample in iter_shard(url):
            if sample["__key__"] != "01002":
                image, _ = _decoder()(sample, epoch=3)
                expected[(url, sample["__key__"])] = _mean_colour(image[None])[0]
    workers_copy = pickle.loads(pickle.dumps(cache))  # (what a loader worker gets: the folder, no open shards)
    assert workers_copy._open == {}
    for (url, key), row in expected.items():
        got = workers_copy.lookup({"__url__": url, "__key__": key})
        assert got.dtype == torch.float32 and torch.equal(got, row), key
    assert workers_copy.lookup({"__url__": urls[1], "__key__": "01002"}) is None  # bad when built: not cached
    assert workers_copy.lookup({"__url__": str(tmp_path / "other.tar"), "__key__": "00000"}) is None


def test_an_unreadable_shard_is_left_out_and_counted(tmp_path):
    urls = _shards(tmp_path / "data", count=2)
    Path(urls[1]).write_bytes(b"\0" * 100 + b"not a tar" * 1000)
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    counts = _build(cache, [*urls, str(tmp_path / "data" / "gone.tar")])
    assert cache.done(urls[0]) and not cache.done(urls[1])
    assert (counts["embedded"], counts["failed"], counts["samples"]) == (1, 2, 5)


def test_the_decoder_reads_cached_rows_instead_of_decoding(tmp_path):
    url = _shards(tmp_path / "data", count=1, per_shard=3)[0]
    samples = list(iter_shard(url))
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    cache.write(url, ["00000", "00001"], rows)  # 00002 is not in the cache
    plain, cached = _decoder(), _decoder(features=cache)

    broken = {**samples[0], "jpg": BROKEN}  # cached: its image bytes are never decoded
    feature, caption = cached(broken, epoch=0)
    assert torch.equal(feature, torch.from_numpy(rows[0])) and caption == plain(samples[0], 0)[1] == "caption 00000"
    with pytest.raises(BadSample) as bad:
        cached(samples[2], epoch=0)  # decodes, yet the build left it out: counted, never trained on as pixels
    assert bad.value.kind == "uncached"
    with pytest.raises(BadSample) as bad:
        cached({**samples[2], "jpg": BROKEN}, epoch=0)  # not cached because it is bad: the same kind as without
    assert bad.value.kind == "bad_image"


def test_a_full_image_crop_is_the_same_every_epoch():
    # 400 x 301: aspect ratios near 4/3 round to boxes a pixel narrower, which the random search used to find
    boxes = {random_resized_crop_box(400, 301, (1.0, 1.0), random.Random(seed)) for seed in range(300)}
    assert boxes == {(0, 0, 400, 301)}
    boxes = {random_resized_crop_box(600, 200, (1.0, 1.0), random.Random(seed)) for seed in range(20)}
    assert boxes == {(166, 0, 433, 200)}  # outside 3/4..4/3: the centre crop at 4/3


def test_the_cache_is_refused_beside_a_teacher():
    cfg = OmegaConf.to_object(OmegaConf.structured(RootConfig))
    cfg.data.cache_image_features, cfg.model.lock_image, cfg.data.crop_scale_min = True, True, 1.0
    config_lib._validate_feature_cache(cfg)  # (accepted as it is)
    cfg.distill.teacher = "teacher-run"
    with pytest.raises(ConfigError, match="distill.teacher"):
        config_lib._validate_feature_cache(cfg)


def test_another_tower_or_setting_gets_another_folder(tmp_path):
    tower = torch.nn.Linear(3, 2)
    base = feature_cache.describe(RootConfig(), feature_cache.tower_digest(tower), 32, (0.5,) * 3, (0.2,) * 3, None)
    folder = feature_cache.folder_for(tmp_path, base)
    assert folder == feature_cache.folder_for(tmp_path, dict(base))
    with torch.no_grad():
        tower.weight[0, 0] += 1e-6
    for changed in ({"image_tower": feature_cache.tower_digest(tower)}, {"image_size": 64}, {"precision": "bfloat16"}):
        assert feature_cache.folder_for(tmp_path, {**base, **changed}) != folder, changed
