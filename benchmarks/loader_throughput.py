"""Training-loader throughput per process (= per core): images/s from tar shards to model-ready tensors.

Three pipelines on the same shards (JPEG sources of ~512 px and ~256 px, 224 px output), each in one process:
  clipkit       clipkit's stream: tar read -> JPEG draft-mode decode -> RandomResizedCrop(0.9-1.0) -> uint8 CHW
                (normalised later on the device), caption pick, tokenisation per batch
  open_clip     the pipeline open_clip builds: wds.WebDataset -> decode("pilrgb") -> open_clip's own
                image_transform(224, is_train=True) (float, normalised) + per-sample tokenisation
  decode-only   tar read + full-resolution PIL decode to RGB: the ceiling for any pipeline that decodes

    python benchmarks/loader_throughput.py --num-images 1500

``--dirty`` measures what bad data costs instead: clipkit's loader over the same shards clean and with faults
injected as the reliability suite does (1% truncated JPEGs, 1% non-images, 1% missing and 0.5% empty captions),
several rounds each, alternating, median and spread of samples/s and the dirty/clean ratio of the medians.
(The reliability suite checks the cost as work counted, not seconds: one read per shard, one decode per image.)

    python benchmarks/loader_throughput.py --dirty --num-images 1500 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (the repository root, for tests.shardsets)

from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from clipkit.data.writer import write_shard, write_sizes_file  # noqa: E402
from tests.shardsets import FAULTS, inject  # noqa: E402  (the reliability suite's faults)


def photo_like(rng: random.Random, width: int, height: int) -> bytes:
    """A smooth image with shapes and grain (JPEG-compresses like a photo, unlike white noise)."""
    base = np.linspace(0, 1, width)[None, :, None] * np.array([rng.random() for _ in range(3)]) * 255
    base = base + np.linspace(0, 1, height)[:, None, None] * np.array([rng.random() for _ in range(3)]) * 120
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(10, width // 3)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    grain = np.random.default_rng(rng.randrange(2**31)).normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, side: int, n: int, dirty: bool = False) -> str:
    rng = random.Random(side)
    per = (n + 1) // 2
    kinds = [k for k, f in FAULTS.items() for _ in range(round(f * n))] if dirty else []
    faulty = dict(zip(random.Random(1).sample(range(n), len(kinds)), kinds, strict=True))
    for s in range(2):
        samples = []
        for i in range(s * per, min(n, (s + 1) * per)):
            w, h = side + rng.randrange(-side // 8, side // 8), side + rng.randrange(-side // 8, side // 8)
            sample = {"__key__": f"{i:06d}", "jpg": photo_like(rng, w, h), "txt": f"a photo number {i}"}
            samples.append(inject(sample, faulty[i]) if i in faulty else sample)
        write_shard(root / f"{s:05d}.tar", samples)
    write_sizes_file(root, {f"{s:05d}.tar": min(n, (s + 1) * per) - s * per for s in range(2)})
    return str(root / "{00000..00001}.tar")


def run_clipkit(
    spec: str, n: int, batch: int = 64, max_bad_fraction: float = 0.1, workers: int = 0, streams: int = 0
) -> float:
    """clipkit's loader with ``workers`` DataLoader workers (0: in this process) reading ``streams`` canonical
    streams (0: what ``data.streams=0`` picks for a global batch of ``batch``, as `clipkit train` does)."""
    import open_clip

    from clipkit.data.config import DataConfig
    from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards

    shards, weights = resolve_shards(spec)
    decoder = SampleDecoder(("jpg",), "txt", 224, (0.9, 1.0), 0)
    loader = TrainLoader(
        shards,
        weights,
        decoder,
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=batch,
        window=256,
        streams=streams or DataConfig().stream_count(batch),
        max_bad_fraction=max_bad_fraction,
    )
    if workers:
        next(loader)  # (workers started: their start-up is not throughput)
    t0 = time.perf_counter()
    seen = 0
    while seen < n:
        seen += next(loader)["image"].shape[0]
    loader.close()
    return seen / (time.perf_counter() - t0)


def run_open_clip(spec: str, n: int) -> float:
    import open_clip
    import webdataset as wds
    from open_clip.transform import image_transform

    preprocess = image_transform(
        224, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ds = (
        wds.WebDataset(spec, shardshuffle=False, empty_check=False)
        .decode("pilrgb")
        .to_tuple("jpg", "txt")
        .map_tuple(preprocess, lambda t: tokenizer([t])[0])
    )
    t0 = time.perf_counter()
    seen = 0
    while seen < n:
        for _ in ds:
            seen += 1
            if seen == n:
                break
    return seen / (time.perf_counter() - t0)


def run_decode_only(spec: str, n: int) -> float:
    from clipkit.data.shards import expand_spec
    from clipkit.data.stream import iter_shard

    urls = expand_spec(spec)[0].urls
    t0 = time.perf_counter()
    seen = 0
    while seen < n:
        for url in urls:
            for sample in iter_shard(url):
                Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                seen += 1
                if seen == n:
                    break
            if seen == n:
                break
    return seen / (time.perf_counter() - t0)


def dirty_vs_clean(args) -> None:
    """clipkit's loader on the same photo-like shards, clean and with faults, alternating rounds."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            specs = {
                kind: make_shards(Path(tmp) / f"{kind}{side}", side, args.num_images, kind == "dirty")
                for kind in ("clean", "dirty")
            }
            # (the dirty stream delivers fewer good samples: read as many good ones as that epoch holds)
            good = args.num_images - sum(round(f * args.num_images) for f in FAULTS.values())
            rates: dict[str, list[float]] = {"clean": [], "dirty": []}
            for _ in range(args.repeats):
                for kind, spec in specs.items():
                    rates[kind].append(run_clipkit(spec, good - good % 64))
            row = {"source_px": side, "rounds": args.repeats}
            for kind, r in rates.items():
                row[kind] = {"median": statistics.median(r), "min": min(r), "max": max(r), "all": r}
            row["dirty_vs_clean"] = row["dirty"]["median"] / row["clean"]["median"]
            rows.append(row)
    print(f"\nclipkit loader, clean vs dirty shards ({args.num_images} JPEGs, faults {FAULTS}), samples/s, 1 core")
    print(f"{'source':>8} | {'clean median (min-max)':>24} | {'dirty median (min-max)':>24} | dirty/clean")
    for r in rows:
        c, d = r["clean"], r["dirty"]
        print(
            f"{r['source_px']:>6}px | {c['median']:>8.0f} ({c['min']:.0f}-{c['max']:.0f}){'':>6} | "
            f"{d['median']:>8.0f} ({d['min']:.0f}-{d['max']:.0f}){'':>6} | {r['dirty_vs_clean']:.2f}"
        )
    meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    write_results(args.out, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=1500)
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dirty", action="store_true", help="clean vs dirty shards through clipkit's loader")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or f"benchmarks/out/loader_{'dirty' if args.dirty else 'throughput'}.json"
    import torch

    torch.set_num_threads(1)  # one core per loader process, as in DataLoader workers
    if args.dirty:
        return dirty_vs_clean(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            spec = make_shards(Path(tmp) / str(side), side, args.num_images)
            row = {"source_px": side, "output_px": 224}
            for name, fn in (("decode_only", run_decode_only), ("open_clip", run_open_clip), ("clipkit", run_clipkit)):
                row[name] = max(fn(spec, args.num_images) for _ in range(args.repeats))
            row["clipkit_vs_open_clip"] = row["clipkit"] / row["open_clip"]
            row["clipkit_vs_decode_only"] = row["clipkit"] / row["decode_only"]
            rows.append(row)
    print(f"\nloader throughput, images/s per process (1 core), {args.num_images} JPEGs per size, 224 px output")
    print(
        f"{'source':>8} | {'decode-only':>11} | {'open_clip':>9} | {'clipkit':>8} | {'clipkit/open_clip':>17} | "
        f"{'clipkit/decode-only':>19}"
    )
    for r in rows:
        print(
            f"{r['source_px']:>6}px | {r['decode_only']:>11.0f} | {r['open_clip']:>9.0f} | {r['clipkit']:>8.0f} | "
            f"{r['clipkit_vs_open_clip']:>16.2f}x | {r['clipkit_vs_decode_only']:>18.2f}x"
        )
    meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    write_results(args.out, meta)


if __name__ == "__main__":
    main()
