"""Shard sets clipkit did not write: the img2dataset layout, written with plain ``tarfile`` as img2dataset's
writer lays it out (``KEY.jpg``, ``KEY.txt``, ``KEY.json`` with ``caption``, url, status, sizes;
``NNNNN_stats.json`` beside each shard; no ``sizes.json``)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40)}


# The reliability suite's faults, as fractions of the samples (tests/reliability/test_dirty_data.py, and the
# loader benchmark's --dirty mode), and the error kind each is counted as.
FAULTS = {"truncated": 0.01, "nonimage": 0.01, "nocaption": 0.01, "emptycaption": 0.005}
COUNTED_AS = {
    "truncated": "bad_image",
    "nonimage": "bad_image",
    "nocaption": "no_caption",
    "emptycaption": "empty_caption",
}


def inject(sample: dict, kind: str) -> dict:
    """A copy of ``sample`` with one of ``FAULTS`` (``"ok"``: none)."""
    sample = dict(sample)
    if kind == "truncated":
        sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
    elif kind == "nonimage":
        sample["jpg"] = b"<html>not an image</html>" * 8
    elif kind == "nocaption":
        del sample["txt"]
    elif kind == "emptycaption":
        sample["txt"] = "  "
    return sample


def jpeg(colour: tuple[int, int, int], size: int = 40, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def img2dataset_shards(root: Path, num_shards: int = 4, per_shard: int = 40, sizes_json: bool = False) -> list[str]:
    """Writes ``root/{00000..}.tar`` + ``_stats.json`` (and ``sizes.json`` if asked); returns every key."""
    root.mkdir(parents=True, exist_ok=True)
    keys, sizes = [], {}
    names = list(COLOURS)
    for s in range(num_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                colour = names[(s * per_shard + i) % len(names)]
                caption = f"a photo of something {colour}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 40,
                    "height": 40,
                    "original_width": 640,
                    "original_height": 480,
                    "caption": caption,
                    "sha256": "0" * 64,
                }
                _add(tar, f"{key}.jpg", jpeg(COLOURS[colour], seed=s * 1000 + i))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                keys.append(key)
        stats = {"count": per_shard + 2, "successes": per_shard, "failed_to_download": 2, "failed_to_resize": 0}
        (root / f"{s:05d}_stats.json").write_text(json.dumps(stats))
        sizes[f"{s:05d}.tar"] = per_shard
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps(sizes))
    return keys


def gzip_bomb(path: Path, gib: int, before: int = 8, after: int = 8) -> int:
    """A ``.tar.gz`` shard (one gzip stream, as ``tar czf`` writes it) whose sample ``before`` has a ``jpg`` of
    ``gib`` GiB of zeros, in ~4.5 MB per GiB. Returns its number of samples."""
    import zlib

    def part(first: int, stop: int, bomb_header: bool = False) -> bytes:
        buf = io.BytesIO()
        tar = tarfile.TarFile(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
        for i in range(first, stop):
            _add(tar, f"k{i:03d}.txt", b"a caption")
            _add(tar, f"k{i:03d}.jpg", jpeg(COLOURS["red"], seed=i))
        if bomb_header:
            _add(tar, f"k{stop:03d}.txt", b"a caption")
            info = tarfile.TarInfo(f"k{stop:03d}.jpg")
            info.size, info.mtime = gib << 30, 1_700_000_000
            buf.write(info.tobuf(tarfile.USTAR_FORMAT))
        else:
            tar.close()  # (the end-of-archive blocks)
        return buf.getvalue()

    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # (wbits 31: the gzip format)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(gz.compress(part(0, before, bomb_header=True)))
        for _ in range(gib << 10):
            f.write(gz.compress(zeros))
        f.write(gz.compress(part(before + 1, before + 1 + after)))
        f.write(gz.flush())
    return before + 1 + after
