"""Cached tower features (``data.cache_*_features``): the build embeds each shard once (rank r its share, bad
samples left out and counted, an unreadable shard left for training to count), caption rows cover every caption a
sample may be drawn, the cache hands back exactly the rows written, the training decoder reads them instead of
decoding or tokenising, and a full-image crop is the same every epoch. Training with the caches against training
without them: tests/integration/test_locked_towers.py."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from clipkit import config as config_lib
from clipkit.config import RootConfig
from clipkit.data import feature_cache, worker_context
from clipkit.data.feature_rows import IMAGE, TEACHER_IMAGE, TEACHER_TEXT, TEXT, FeatureCache, shard_id
from clipkit.data.loader import BadSample, DataError, SampleDecoder, worker_init
from clipkit.data.stream import Reader, iter_shard
from clipkit.data.transforms import random_resized_crop_box
from clipkit.engine.config import EngineName
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


def _mean_colour(images_u8: torch.Tensor, captions=None) -> torch.Tensor:
    """A stand-in image tower: each image's mean colour (a function of the pixels alone, like a tower in eval mode)."""
    return images_u8.float().mean(dim=(2, 3))


def _caption_code(images, captions: list[str]) -> torch.Tensor:
    """A stand-in text tower: a caption's length, its characters' sum and its spaces (the image tower's width, 3)."""
    return torch.tensor([[len(c), sum(map(ord, c)), c.count(" ")] for c in captions], dtype=torch.float32)


def _build(cache, urls, rank=0, world_size=1, decoder=None, embed=_mean_colour):
    return feature_cache.build(cache, urls, decoder or _decoder(), embed, rank=rank, world_size=world_size,
                               batch_size=2, workers=0, reader=Reader(retries=0), worker_options={})  # fmt: skip


def test_build_embeds_each_shard_once_and_the_cache_gives_back_those_rows(tmp_path):
    urls = _shards(tmp_path / "data", broken=("01002",))
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    first = _build(cache, urls, rank=1, world_size=2)  # rank 1 of 2: the shards 1, 3, ... only
    assert (first["shards"], first["embedded"], first["rows"], first["bad"]) == (1, 1, 4, 1)
    assert [cache.done(u) for u in urls] == [False, True, False]
    rest = _build(cache, urls)  # then rank 0 of 1: what is left, never a shard twice
    assert (rest["embedded"], rest["rows"]) == (2, 10)
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
        got = workers_copy.lookup(url, key)
        assert got.dtype == torch.float32 and torch.equal(got, row), key
    assert workers_copy.lookup(urls[1], "01002") is None  # bad when built: not cached
    assert workers_copy.lookup(str(tmp_path / "other.tar"), "00000") is None


def test_an_unreadable_shard_is_left_out_and_counted(tmp_path):
    urls = _shards(tmp_path / "data", count=2)
    Path(urls[1]).write_bytes(b"\0" * 100 + b"not a tar" * 1000)
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    counts = _build(cache, [*urls, str(tmp_path / "data" / "gone.tar")])
    assert cache.done(urls[0]) and not cache.done(urls[1])
    assert (counts["embedded"], counts["failed"], counts["rows"]) == (1, 2, 5)


def test_a_stalled_build_stops_with_a_message_and_keeps_the_shards_done(tmp_path):
    """(A loader worker reads, as in training: in-process, closing a ``pipe:`` shard waits for its command.)"""
    urls = _shards(tmp_path / "data", count=1)
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    options = {"worker_init_fn": worker_init, "multiprocessing_context": worker_context()}
    with pytest.raises(DataError, match="no batch for data.stall_timeout_s=5 s while embedding"):
        feature_cache.build(cache, [*urls, "pipe:sleep 59.25"], _decoder(), _mean_colour, rank=0, world_size=1,
                            batch_size=2, workers=1, reader=Reader(retries=0), worker_options=options,
                            stall_timeout_s=5)  # fmt: skip
    assert cache.done(urls[0])  # (the stall raised while the 59 s command still ran: its worker was killed)
    subprocess.run(["pkill", "-9", "-f", "sleep 59.25"], check=False)  # (it outlives the killed worker)


def test_the_builds_workers_see_the_environment_set_since_their_server_started(tmp_path, monkeypatch):
    """(Storage credentials exported in Python after the loader's fork server started, as for training.)"""
    url = _shards(tmp_path / "data", count=1)[0]
    worker_context(start=True)
    monkeypatch.setenv("CLIPKIT_TEST_CREDENTIAL", "set-late")
    cache = FeatureCache(tmp_path / "cache")
    cache.folder.mkdir()
    options = {"worker_init_fn": worker_init, "multiprocessing_context": worker_context()}
    guarded = f'pipe:test "$CLIPKIT_TEST_CREDENTIAL" = set-late && cat {url}'
    counts = feature_cache.build(cache, [guarded], _decoder(), _mean_colour, rank=0, world_size=1, batch_size=2,
                                 workers=1, reader=Reader(retries=0), worker_options=options)  # fmt: skip
    assert (counts["embedded"], counts["failed"], counts["rows"]) == (1, 0, 5)


def test_the_decoder_reads_cached_rows_instead_of_decoding(tmp_path):
    url = _shards(tmp_path / "data", count=1, per_shard=3)[0]
    samples = list(iter_shard(url))
    images = FeatureCache(tmp_path / "cache", IMAGE)
    images.folder.mkdir()
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    images.write(url, ["00000", "00001"], rows)  # 00002 is not in the cache
    plain, cached = _decoder(), _decoder(caches={IMAGE: images})

    broken = {**samples[0], "jpg": BROKEN}  # cached: its image bytes are never decoded
    feature, caption = cached(broken, epoch=0)
    assert torch.equal(feature, torch.from_numpy(rows[0])) and caption == plain(samples[0], 0)[1] == "caption 00000"
    with pytest.raises(BadSample) as bad:
        cached(samples[2], epoch=0)  # decodes, yet the build left it out: counted, never trained on as pixels
    assert bad.value.kind == "uncached"
    with pytest.raises(BadSample) as bad:
        cached({**samples[2], "jpg": BROKEN}, epoch=0)  # not cached because it is bad: the same kind as without
    assert bad.value.kind == "bad_image"


def _listed_shard(root: Path) -> str:
    """One shard whose samples carry a list of captions in json (the demo's layout) and a recaption field."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(4):
            meta = {"captions": [f"shape {i}", f"colour {i}", "same for all"], "recaption": f"recaptioned {i}"}
            _add(tar, f"{i:03d}.jpg", jpeg((50 * i, 90, 90), seed=i))
            _add(tar, f"{i:03d}.json", json.dumps(meta).encode())
    return str(path)


def test_caption_rows_cover_every_caption_a_sample_may_be_drawn(tmp_path):
    url = _listed_shard(tmp_path / "data")
    decoder = SampleDecoder(("jpg",), "json:captions", 16, (1.0, 1.0), 0)
    text = FeatureCache(tmp_path / "text", TEXT)
    text.folder.mkdir()
    counts = _build(text, [url], decoder=decoder, embed=_caption_code)
    assert counts["rows"] == 9  # 4 x 2 own captions + "same for all" once per shard
    cached = dataclasses.replace(decoder, caches={TEXT: text})
    drawn = set()
    for sample in iter_shard(url):
        for epoch in range(12):
            _, caption = decoder(sample, epoch)
            image, row = cached(sample, epoch)  # the same draw, its row in place of the caption
            assert image.dtype == torch.uint8 and torch.equal(row, _caption_code(None, [caption])[0])
            drawn.add(caption)
    assert len(drawn) == 9

    mixed = SampleDecoder(
        ("jpg",), "auto", 16, (1.0, 1.0), 0, captions=(("json:captions", 0.5), ("json:recaption", 0.5))
    )
    assert mixed.candidates(next(iter_shard(url))) == ["shape 0", "colour 0", "same for all", "recaptioned 0"]


def test_the_teachers_rows_are_joined_image_then_text(tmp_path):
    url = _listed_shard(tmp_path / "data")
    decoder = SampleDecoder(("jpg",), "json:captions", 16, (1.0, 1.0), 0)
    caches = {kind: FeatureCache(tmp_path / kind, kind) for kind in (TEACHER_IMAGE, TEACHER_TEXT)}
    for kind, cache in caches.items():
        cache.folder.mkdir()
        _build(cache, [url], decoder=decoder, embed=_mean_colour if kind == TEACHER_IMAGE else _caption_code)
    cached = dataclasses.replace(decoder, caches=caches)
    sample = next(iter_shard(url))
    image, caption = cached(sample, epoch=5)
    assert caption == decoder(sample, 5)[1] and image.dtype == torch.uint8  # (the student's own inputs untouched)
    expected = torch.cat([_mean_colour(image[None])[0], _caption_code(None, [caption])[0]])
    assert torch.equal(cached.teacher_row, expected)
    teacher = feature_cache.CachedTeacher(torch.tensor(20.0), "teacher")
    out = teacher(None, None, torch.stack([expected, expected]))
    assert torch.equal(out["image_features"][0], expected[:3]) and torch.equal(out["text_features"][1], expected[3:])


def test_a_full_image_crop_is_the_same_every_epoch():
    # 400 x 301: aspect ratios near 4/3 round to boxes a pixel narrower, which the random search used to find
    boxes = {random_resized_crop_box(400, 301, (1.0, 1.0), random.Random(seed)) for seed in range(300)}
    assert boxes == {(0, 0, 400, 301)}
    boxes = {random_resized_crop_box(600, 200, (1.0, 1.0), random.Random(seed)) for seed in range(20)}
    assert boxes == {(166, 0, 433, 200)}  # outside 3/4..4/3: the centre crop at 4/3


def test_a_teacher_needs_its_own_cache_beside_a_cached_tower():
    cfg = OmegaConf.to_object(OmegaConf.structured(RootConfig))
    cfg.data.cache_image_features, cfg.model.lock_image, cfg.data.crop_scale_min = True, True, 1.0
    config_lib._validate_feature_cache(cfg)  # (accepted as it is)
    cfg.distill.teacher = "teacher-run"
    with pytest.raises(ConfigError, match="add data.cache_teacher_features=true"):
        config_lib._validate_feature_cache(cfg)  # (the teacher would need the pixels the cache replaces)
    cfg.data.cache_teacher_features = True
    config_lib._validate_feature_cache(cfg)


def test_another_tower_or_setting_gets_another_folder(tmp_path):
    model = torch.nn.ModuleDict({"visual": torch.nn.Linear(3, 2), "transformer": torch.nn.Linear(2, 2)})
    digests = feature_cache.tower_digests(model, [IMAGE, TEXT])
    base = {"kind": IMAGE, "tower": digests[IMAGE], "image_size": 32, "precision": "float32"}
    folder = feature_cache.folder_for(tmp_path, base)
    assert folder == feature_cache.folder_for(tmp_path, dict(base))
    with torch.no_grad():
        model["visual"].weight[0, 0] += 1e-6
    after = feature_cache.tower_digests(model, [IMAGE, TEXT])
    assert after[TEXT] == digests[TEXT] and after[IMAGE] != digests[IMAGE]  # (each tower's own weights)
    for changed in ({"tower": after[IMAGE]}, {"image_size": 64}, {"precision": "bfloat16"}, {"kind": TEACHER_IMAGE}):
        assert feature_cache.folder_for(tmp_path, {**base, **changed}) != folder, changed


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_every_engine_names_its_cache_folder(engine):
    cfg = OmegaConf.to_object(OmegaConf.structured(RootConfig))
    cfg.parallel.engine = EngineName(engine)
    settings = feature_cache.student_settings(cfg, torch.bfloat16)
    assert settings == {"model": "clipkit-tiny", "precision": "bfloat16", "engine": engine}
    assert json.loads(json.dumps(settings)) == settings  # (cache.json)


def test_float16_rows_take_half_the_disk_and_come_back_as_float32(tmp_path):
    url = _shards(tmp_path / "data", count=1)[0]
    caches = {dtype: FeatureCache(tmp_path / dtype, IMAGE, dtype) for dtype in ("float32", "float16")}
    rows = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    for cache in caches.values():
        cache.folder.mkdir()
        cache.write(url, [f"k{i}" for i in range(5)], rows.numpy())
    full, half = (caches[d].lookup(url, "k3") for d in ("float32", "float16"))
    assert full.dtype == half.dtype == torch.float32 and torch.equal(full, rows[3])
    assert 0 < (half - rows[3]).abs().max() < 1e-3  # (unit vectors: float16's 11 bits)
    row_bytes = {d: (c.folder / f"{shard_id(url)}.npy").stat().st_size - 128 for d, c in caches.items()}
    assert row_bytes == {"float32": 5 * 64 * 4, "float16": 5 * 64 * 2}  # (after numpy's 128-byte header)
    assert caches["float16"].nbytes([url]) < caches["float32"].nbytes([url])
    assert pickle.loads(pickle.dumps(caches["float16"])).dtype == "float16"
