"""``clipkit shards``: local images + captions -> webdataset shards in the img2dataset layout.

Inputs: a folder (each image with a same-stem ``.txt`` caption), or a CSV / parquet table with an image-path
column and a caption column (paths relative to the table's folder). Output per shard: ``NNNNN.tar`` holding
``KEY.<ext>``, ``KEY.txt``, ``KEY.json`` (caption, key, source path, sizes, status), ``NNNNN_stats.json``
(count, successes, failures), and ``sizes.json`` for the whole folder, which the loader reads. Keys are
``SSSSSIIII`` (shard, index) as img2dataset writes them. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from clipkit.data.tables import read_records
from clipkit.data.writer import write_shard, write_sizes_file

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def read_folder(folder: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = path.with_suffix(".txt")
        rows.append((str(path), txt.read_text(errors="replace").strip() if txt.is_file() else ""))
    return rows


def read_table(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    try:
        records = read_records(path, [image_column, caption_column])
    except ValueError as err:
        raise SystemExit(f"clipkit shards: {err}") from None
    base = path.parent
    return [(str(base / str(r[image_column])), str(r[caption_column] or "").strip()) for r in records]


def _encode(path: str, resize: int) -> tuple[str, bytes, dict]:
    """(extension, bytes, size info); raises on an unreadable image. Re-encodes only when resizing."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        width, height = img.size
        info = {"original_width": width, "original_height": height, "width": width, "height": height}
        if resize and min(width, height) > resize:
            scale = resize / min(width, height)
            out = img.convert("RGB").resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            out.save(buf, format="JPEG", quality=95)
            info.update(width=out.size[0], height=out.size[1])
            return "jpg", buf.getvalue(), info
    return IMAGE_EXTS[Path(path).suffix.lower()], data, info


def _write_one(job: tuple) -> dict:
    out_dir, shard_idx, rows, resize = job
    stats = {"count": len(rows), "successes": 0, "failed_to_read": 0, "failed_no_caption": 0, "failures": []}

    def samples():
        for i, (path, caption) in enumerate(rows):
            if not caption:
                stats["failed_no_caption"] += 1
                stats["failures"].append(f"{path}: no caption")
                continue
            try:
                ext, data, info = _encode(path, resize)
            except Exception as err:
                stats["failed_to_read"] += 1
                stats["failures"].append(f"{path}: {err.__class__.__name__}: {err}"[:300])
                continue
            key = f"{shard_idx:05d}{i:04d}"
            meta = {"caption": caption, "key": key, "path": path, "status": "success", **info}
            stats["successes"] += 1
            yield {"__key__": key, ext: data, "txt": caption, "json": json.dumps(meta)}

    name = f"{shard_idx:05d}.tar"
    write_shard(Path(out_dir) / name, samples())
    (Path(out_dir) / f"{shard_idx:05d}_stats.json").write_text(json.dumps(stats, indent=1))
    return {"name": name, **stats}


def make_shards(
    rows: list[tuple[str, str]],
    out_dir: Path,
    shard_size: int = 10000,
    resize: int = 0,
    num_procs: int = 1,
    progress: bool = True,
) -> dict:
    """Writes the shards; returns a summary (shards, samples written, failures)."""
    if shard_size > 9999:
        raise ValueError("shard_size must be <= 9999 (keys are SSSSSIIII, as img2dataset writes them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), k, rows[s : s + shard_size], resize) for k, s in enumerate(range(0, len(rows), shard_size))]
    bar = tqdm(total=len(rows), unit="img", desc="shards", disable=not progress, file=sys.stderr)
    results = []
    if num_procs > 1:
        with mp.get_context("spawn").Pool(num_procs) as pool:
            for res in pool.imap(_write_one, jobs):
                results.append(res)
                bar.update(res["count"])
    else:
        for job in jobs:
            results.append(_write_one(job))
            bar.update(results[-1]["count"])
    bar.close()
    write_sizes_file(out_dir, {r["name"]: r["successes"] for r in results})
    return {
        "shards": len(results),
        "samples": sum(r["successes"] for r in results),
        "failed_to_read": sum(r["failed_to_read"] for r in results),
        "failed_no_caption": sum(r["failed_no_caption"] for r in results),
        "failures": [f for r in results for f in r["failures"]],
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="clipkit shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("input", type=Path, help="a folder of images with .txt captions, or a .csv / .parquet table")
    ap.add_argument("output", type=Path, help="folder for the shards (created)")
    ap.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    ap.add_argument("--resize", type=int, default=0, help="resize the shorter side to this many pixels (0 = keep)")
    ap.add_argument("--procs", type=int, default=max(1, mp.cpu_count() - 1), help="parallel writer processes")
    ap.add_argument("--image-column", default="image")
    ap.add_argument("--caption-column", default="caption")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder whole")
    args = ap.parse_args(argv)
    if not args.input.exists():
        print(f"clipkit shards: input not found: {args.input}", file=sys.stderr)
        return 2
    out = args.output
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(
            f"clipkit shards: {out} is not empty (shards already there would mix with the new ones): choose a new "
            "folder, or --overwrite to replace it whole",
            file=sys.stderr,
        )
        return 2
    if args.shard_size <= 0 or args.shard_size > 9999:
        print(f"clipkit shards: --shard-size={args.shard_size}: must be in 1..9999", file=sys.stderr)
        return 2
    rows = (
        read_folder(args.input)
        if args.input.is_dir()
        else read_table(args.input, args.image_column, args.caption_column)
    )
    if not rows:
        print(f"clipkit shards: no images found in {args.input}", file=sys.stderr)
        return 2
    # Written beside the output under a temporary name, then moved into place whole: an existing folder is replaced
    # only by a complete new set (no stale later shards, no merged sizes.json), and an error leaves nothing.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = make_shards(rows, tmp, args.shard_size, args.resize, args.procs)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for failure in summary["failures"][:20]:
        print(f"skipped {failure}", file=sys.stderr)
    if len(summary["failures"]) > 20:
        print(f"... and {len(summary['failures']) - 20} more (see {args.output}/*_stats.json)", file=sys.stderr)
    print(
        f"wrote {summary['samples']} samples in {summary['shards']} shards to {args.output} "
        f"({summary['failed_to_read']} unreadable, {summary['failed_no_caption']} without caption skipped)"
    )
    return 0
