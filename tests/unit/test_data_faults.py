"""Bad input is skipped and counted per kind, exactly; img2dataset layout; weighted sources; pipe: refusal."""

from __future__ import annotations

import collections
import io
import itertools
import json
import random
import tarfile

import open_clip
import pytest
from PIL import Image

from clipkit.data.loader import BadSample, DataError, SampleDecoder, TrainLoader, decoded, resolve_shards
from clipkit.data.shards import ShardSpecError, expand_spec
from clipkit.data.stream import MemberTooLarge, Reader, ShardReadError, StreamPlan, iter_shard, iter_stream
from clipkit.data.writer import write_shard, write_sizes_file


def _jpeg(rng: random.Random, size: int = 48) -> bytes:
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dirty_shards(root, num_shards=4, per_shard=250, seed=0):
    """Shards with injected faults; returns the expected per-kind counts and the clean keys."""
    rng = random.Random(seed)
    total = num_shards * per_shard
    kinds = ["truncated"] * (total // 100) + ["nonimage"] * (total // 100) + ["nocaption"] * (total // 100)
    kinds += ["emptycaption"] * (total // 200) + ["noimage"] * 3
    kinds += ["ok"] * (total - len(kinds))
    rng.shuffle(kinds)
    expected = collections.Counter()
    clean, sizes = set(), {}
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            kind = kinds[s * per_shard + i]
            key = f"s{s}_{i:04d}"
            sample = {"__key__": key, "jpg": _jpeg(rng), "txt": f"caption {key}"}
            if kind == "truncated":
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
                expected["bad_image"] += 1
            elif kind == "nonimage":
                sample["jpg"] = b"this is not an image" * 20
                expected["bad_image"] += 1
            elif kind == "nocaption":
                del sample["txt"]
                expected["no_caption"] += 1
            elif kind == "emptycaption":
                sample["txt"] = "   "
                expected["empty_caption"] += 1
            elif kind == "noimage":
                del sample["jpg"]
                expected["no_image"] += 1
            else:
                clean.add(key)
            samples.append(sample)
        write_shard(root / f"{s:05d}.tar", samples)
        sizes[f"{s:05d}.tar"] = per_shard
    write_sizes_file(root, sizes)
    return expected, clean


def cut_tar(path, keep_samples: int) -> list[str]:
    """Truncates a shard at the header of sample ``keep_samples`` (as a copy cut short would); returns lost keys."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    first_lost = next(m for m in members if m.name.startswith(keys[keep_samples] + "."))
    with open(path, "r+b") as f:
        f.truncate(first_lost.offset)
    return keys[keep_samples:]


def epoch_counts(spec, world, workers, caption_key="txt"):
    shards, weights = resolve_shards(spec)
    decoder = SampleDecoder(("jpg", "png", "webp"), caption_key, 32, (0.9, 1.0), 0)
    errors, keys = collections.Counter(), collections.Counter()
    plan = StreamPlan(shards, weights, "epoch", 0, world * max(1, workers), 64)
    for stream in range(plan.streams):
        for epoch, _, item, _ in decoded(plan, decoder, stream, 0, 0):
            if epoch > 0:
                break
            if isinstance(item, BadSample):
                errors[item.kind] += 1
            else:
                keys[item[2]] += 1
    return errors, keys


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 3)])
def test_injected_faults_are_counted_exactly(tmp_path, world, workers):
    expected, clean = dirty_shards(tmp_path)
    errors, keys = epoch_counts(str(tmp_path / "{00000..00003}.tar"), world, workers)
    assert dict(errors) == dict(expected)  # 10 truncated + 10 non-images, 10 no caption, 5 empty, 3 no image
    assert set(keys) == clean and set(keys.values()) == {1}


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 3)])
def test_cut_tar_loses_only_what_was_cut(tmp_path, world, workers):
    expected, clean = dirty_shards(tmp_path)
    lost = set(cut_tar(tmp_path / "00002.tar", keep_samples=180))
    errors, keys = epoch_counts(str(tmp_path / "{00000..00003}.tar"), world, workers)
    assert errors["missing"] == len(lost) == 70
    assert set(keys) == clean - lost and set(keys.values()) == {1}
    # Faults in the cut-off part are lost with it (counted as missing); all others keep their own kind.
    assert sum(errors.values()) + len(keys) == 1000


def test_missing_samples_name_their_shard(tmp_path):
    dirty_shards(tmp_path, num_shards=2, per_shard=100)
    cut_tar(tmp_path / "00001.tar", keep_samples=10)
    shards, weights = resolve_shards(str(tmp_path / "{00000..00001}.tar"))
    decoder = SampleDecoder(("jpg",), "txt", 32, (0.9, 1.0), 0)
    stream = decoded(StreamPlan(shards, weights, "epoch", 0, 1, 0), decoder, 0, 0, 0)
    epoch0 = itertools.takewhile(lambda x: x[0] == 0, stream)  # the stream is endless: stop after epoch 0
    urls = collections.Counter(u for _, _, item, u in epoch0 if isinstance(item, BadSample) and item.kind == "missing")
    assert urls == {str(tmp_path / "00001.tar"): 90}


def test_too_many_bad_samples_stop_the_run_naming_shards(tmp_path):
    rng = random.Random(0)
    samples = [{"__key__": f"k{i:04d}", "jpg": _jpeg(rng) if i % 3 else b"junk", "txt": "x"} for i in range(1200)]
    write_shard(tmp_path / "00000.tar", samples)
    shards, weights = resolve_shards(str(tmp_path / "00000.tar"))
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "txt", 32, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        batch_size=16,
        window=0,
        max_bad_fraction=0.2,
    )
    with pytest.raises(DataError, match=r"bad_image.*00000\.tar"):
        for _ in range(200):
            next(loader)


def test_img2dataset_layout(tmp_path):
    """KEY.jpg + KEY.txt + KEY.json (caption, url, status, ...), NNNNN_stats.json, no sizes.json."""
    rng = random.Random(1)
    for s in range(2):
        samples = []
        for i in range(30):
            key = f"{s:05d}{i:04d}"
            meta = {
                "caption": f"picture {key}",
                "url": f"http://x/{key}.jpg",
                "key": key,
                "status": "success",
                "width": 48,
                "height": 48,
                "original_width": 640,
                "original_height": 480,
            }
            samples.append({"__key__": key, "jpg": _jpeg(rng), "txt": f"picture {key}", "json": json.dumps(meta)})
        write_shard(tmp_path / f"{s:05d}.tar", samples)
        (tmp_path / f"{s:05d}_stats.json").write_text(
            json.dumps({"count": 31, "successes": 30, "failed_to_download": 1})
        )
    shards, _ = resolve_shards(str(tmp_path / "{00000..00001}.tar"))
    assert [s.num_samples for s in shards] == [30, 30]
    errors, keys = epoch_counts(str(tmp_path / "{00000..00001}.tar"), 1, 0, caption_key="json:caption")
    assert not errors and len(keys) == 60


def test_sizes_from_tar_headers_when_no_index(tmp_path):
    rng = random.Random(2)
    write_shard(tmp_path / "a.tar", [{"__key__": f"k{i}", "jpg": _jpeg(rng), "txt": "t"} for i in range(17)])
    assert [s.num_samples for s in resolve_shards(str(tmp_path / "a.tar"))[0]] == [17]


def test_weighted_sources_in_resampled_mode(tmp_path):
    rng = random.Random(3)
    for src, n_shards in (("a", 2), ("b", 6)):
        for s in range(n_shards):
            write_shard(
                tmp_path / src / f"{s}.tar",
                [{"__key__": f"{src}{s}_{i}", "jpg": _jpeg(rng, 8), "txt": "t"} for i in range(5)],
            )
    spec = f"{tmp_path}/a/{{0..1}}.tar@0.8::{tmp_path}/b/{{0..5}}.tar@0.2"
    shards, weights = resolve_shards(spec)
    assert weights == [0.8, 0.2]
    draws = collections.Counter()
    plan = StreamPlan(shards, weights, "resampled", 0, 4, 0)
    for stream in range(4):
        for epoch in range(500):
            for seg in plan.segments(stream, epoch):
                draws["a" if "/a/" in seg.url else "b"] += 1
    share = draws["a"] / sum(draws.values())
    assert abs(share - 0.8) < 0.03, (share, draws)  # 4000 draws: 5 standard deviations is 0.032


def test_pipe_urls_refused_when_switched_off():
    assert expand_spec("pipe:cat /data/{0..2}.tar")[0].urls[0] == "pipe:cat /data/0.tar"
    with pytest.raises(ShardSpecError, match="pipe: URLs are refused"):
        expand_spec("pipe:curl -s http://x/{0..2}.tar", allow_pipe=False)


def test_shards_of_unknown_size_are_read_to_their_end(tmp_path):
    """pipe: shards (no size known): every sample of every shard once per epoch, the tail of larger shards
    included, with several slots; a position resumes exactly."""
    rng = random.Random(4)
    sizes = [13, 40, 7, 25]
    for s, n in enumerate(sizes):
        write_shard(
            tmp_path / f"{s}.tar", [{"__key__": f"s{s}_{i}", "jpg": _jpeg(rng, 8), "txt": "t"} for i in range(n)]
        )
    spec = f"pipe:cat {tmp_path}/{{0..3}}.tar"
    shards, weights = resolve_shards(spec)
    assert [s.num_samples for s in shards] == [-1] * 4
    keys = collections.Counter()
    plan = StreamPlan(shards, weights, "epoch", 0, 4, 32)
    for stream in range(4):
        for e, _, sample in iter_stream(plan, stream, 0, 0):
            if e > 0:
                break
            keys[sample["__key__"]] += 1
    assert len(keys) == sum(sizes) and set(keys.values()) == {1}
    plan = StreamPlan(shards, weights, "epoch", 0, 2, 16)
    full = [(e, t, s["__key__"]) for e, t, s in itertools.islice(iter_stream(plan, 1, 0, 0), 60)]
    resumed = [(e, t, s["__key__"]) for e, t, s in itertools.islice(iter_stream(plan, 1, *full[20][:2]), 40)]
    assert resumed == full[20:]


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read in chunks (a member tarfile copies without holding it)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def bomb_shard(path, compression: str, bomb_mb: int, before: int = 5, after: int = 5, **kw) -> list[str]:
    """A shard whose sample ``before`` has a ``jpg`` of ``bomb_mb`` MiB of zeros (a few KB once compressed);
    returns the keys in tar order."""
    rng, keys = random.Random(0), []
    with tarfile.open(path, "w:" + compression, format=tarfile.USTAR_FORMAT, **kw) as tar:
        for i in range(before + 1 + after):
            key = f"k{i:03d}"
            keys.append(key)
            size = bomb_mb << 20 if i == before else 0
            image = _Zeros(size) if size else io.BytesIO(_jpeg(rng))
            for name, data, n in ((f"{key}.txt", io.BytesIO(b"a caption"), 9), (f"{key}.jpg", image, size)):
                info = tarfile.TarInfo(name)
                info.size = n or len(data.getvalue())
                tar.addfile(info, data)
    return keys


@pytest.mark.parametrize("compression", ["", "gz", "xz"])
def test_a_member_over_the_cap_ends_the_shard_in_bounded_memory(tmp_path, compression):
    import tracemalloc

    path = tmp_path / ("00000.tar" + (f".{compression}" if compression else ""))
    keys = bomb_shard(path, compression, bomb_mb=48)
    # Without a bound the member is read whole, and the shard's every sample arrives (compressed or not).
    assert [s["__key__"] for s in iter_shard(str(path), Reader(max_member_bytes=0))] == keys
    got = []
    tracemalloc.start()
    try:
        with pytest.raises(ShardReadError) as err:
            for sample in iter_shard(str(path), Reader(max_member_bytes=4 << 20)):
                got.append(sample["__key__"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == keys[:5]  # every sample before the one with the big member: whole
    assert isinstance(err.value.cause, MemberTooLarge) and "data.max_member_mb=4" in str(err.value)
    assert peak < 16 << 20, f"{peak >> 20} MiB held for a 48 MiB member with a 4 MiB cap"


def test_a_member_over_the_cap_counts_the_rest_of_its_shard_missing(tmp_path):
    bomb_shard(tmp_path / "00000.tar.gz", "gz", bomb_mb=8, before=10, after=9)
    write_shard(
        tmp_path / "00001.tar", [{"__key__": f"c{i}", "jpg": _jpeg(random.Random(i)), "txt": "x"} for i in range(20)]
    )
    write_sizes_file(tmp_path, {"00000.tar.gz": 20, "00001.tar": 20})
    shards, weights = resolve_shards(f"{tmp_path}/{{00000.tar.gz,00001.tar}}")
    decoder = SampleDecoder(("jpg",), "txt", 32, (0.9, 1.0), 0)
    stream = decoded(StreamPlan(shards, weights, "epoch", 0, 1, 0), decoder, 0, 0, 0, Reader(max_member_bytes=2 << 20))
    items = [item for _, _, item, _ in itertools.takewhile(lambda x: x[0] == 0, stream)]
    bad = collections.Counter(i.kind for i in items if isinstance(i, BadSample))
    assert bad == {"missing": 10} and len(items) == 40  # the big member's sample and the 9 after it
