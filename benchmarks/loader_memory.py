"""The training loader's shared memory at a large per-rank batch: workers hand over chunks of at most 256 samples
(``clipkit.data.loader.CHUNK``), joined into micro-batches by the loader, against whole micro-batches per worker
(what the loader did before; emulated by a chunk as large as the batch).

Shared memory in flight is about workers x prefetch_factor x hand-over size: at a per-rank batch of 4096 and
224 px (617 MB of uint8 images per batch) whole batches would need ~2.5 GB per worker at the default prefetch
factor of 4. Measured here as the peak of the machine's ``Shmem`` (``/proc/meminfo``, sampled every 20 ms) above
its level before the loader starts, while its workers fill their prefetch slots and it then delivers a few
micro-batches; nothing else should run. (Throughput is ``loader_throughput.py``'s.)

    python benchmarks/loader_memory.py --batch 4096 --workers 2
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import open_clip
from PIL import Image
from results_io import write_results  # (benchmarks/ is on sys.path when run as a script)

from clipkit.data import dir_spec
from clipkit.data import loader as loader_lib
from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards
from clipkit.data.writer import write_shard, write_sizes_file


def shmem_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    raise RuntimeError("no Shmem line in /proc/meminfo")


def make_shards(root: Path, n: int, per_shard: int = 2048) -> str:
    rng = random.Random(0)
    sizes = {}
    for s in range(0, n, per_shard):
        samples = []
        for i in range(s, min(n, s + per_shard)):
            img = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            samples.append({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": f"sample {i}"})
        name = f"{s // per_shard:05d}.tar"
        write_shard(root / name, samples)
        sizes[name] = len(samples)
    write_sizes_file(root, sizes)
    return dir_spec(root)


def measure(spec: str, batch: int, workers: int, batches: int, chunk: int, settle_s: float) -> dict:
    loader_lib.CHUNK = chunk
    shards, weights = resolve_shards(spec)
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "txt", 224, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=batch,
        window=256,
    )
    base, peak, done = shmem_kib(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], shmem_kib())
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    assert next(loader)["image"].shape[0] == batch  # (workers started)
    time.sleep(settle_s)  # the workers fill every prefetch slot: the most shared memory the loader holds
    for _ in range(batches):
        assert next(loader)["image"].shape[0] == batch
    done.set()
    watcher.join()
    loader.close()
    return {
        "handover": loader.chunk,
        "peak_shmem_mib": (peak[0] - base) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3, help="micro-batches taken after the prefetch slots filled")
    ap.add_argument("--settle-s", type=float, default=20.0, help="wait for the workers to fill their slots")
    ap.add_argument("--out", default="benchmarks/out/loader_memory.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_shards(Path(tmp), args.batch * (args.batches + 3 + 4 * args.workers))
        measure(spec, args.batch, args.workers, 1, loader_lib.CHUNK, 0)  # (starts the workers' fork server)
        for label, chunk in (("chunks (now)", loader_lib.CHUNK), ("whole batches (before)", args.batch)):
            row = measure(spec, args.batch, args.workers, args.batches, chunk, args.settle_s)
            rows.append({"loader": label, **row})
    print(f"\nper-rank batch {args.batch} at 224 px, {args.workers} workers, prefetch_factor 4")
    print(f"{'loader':>24} | {'hand-over':>9} | {'peak shared memory':>18}")
    for r in rows:
        print(f"{r['loader']:>24} | {r['handover']:>9} | {r['peak_shmem_mib']:>14.0f} MiB")
    meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    write_results(args.out, {**meta, "batch": args.batch, "workers": args.workers, "rows": rows})


if __name__ == "__main__":
    main()
