"""Training-loader throughput from a local HTTP server against local disk: the same shards, workers, batch and
prefetching (clipkit's defaults), so the ratio is what streaming over HTTP costs the loader.

The server is Python's own ``python -m http.server`` in its own process on 127.0.0.1 (a real HTTP server; no
network latency, so this measures clipkit's remote read path, not a link). Shards: photo-like JPEGs of ~256 px,
decoded to 224 px with clipkit's training transform; one warm-up pass, then timed batches, alternating the two
sources ``--rounds`` times so that machine noise hits both.

    python benchmarks/remote_throughput.py
Goal (issue 13): HTTP at least 0.9x local disk with the default prefetching.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loader_throughput import photo_like  # noqa: E402
from results_io import write_results  # noqa: E402

from clipkit.data.writer import write_shard, write_sizes_file  # noqa: E402


def make_shards(root: Path, num_shards: int, per_shard: int, side: int) -> None:
    rng = random.Random(0)
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            w, h = side + rng.randrange(-side // 8, side // 8), side + rng.randrange(-side // 8, side // 8)
            samples.append({"__key__": f"{s:03d}{i:05d}", "jpg": photo_like(rng, w, h), "txt": f"photo {s} {i}"})
        write_shard(root / f"{s:05d}.tar", samples)
    write_sizes_file(root, {f"{s:05d}.tar": per_shard for s in range(num_shards)})


def rate(spec: str, batches: int, batch: int, workers: int) -> float:
    import open_clip

    from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards

    shards, weights = resolve_shards(spec)
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "auto", 224, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=batch,
        window=1000,
    )
    try:
        for _ in range(2):  # workers started, first batches in flight
            next(loader)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(loader)
        return batches * batch / (time.perf_counter() - t0)
    finally:
        loader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=400)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output", default="benchmarks/out/remote_throughput.json")
    args = ap.parse_args()
    from clipkit.data.loader import worker_context

    worker_context(start=True)
    with tempfile.TemporaryDirectory(prefix="clipkit-remote-") as tmp:
        root = Path(tmp)
        make_shards(root, args.shards, args.per_shard, args.side)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            names = f"{{00000..{args.shards - 1:05d}}}.tar"
            specs = {"local disk": f"{root}/{names}", "http (loopback)": f"http://127.0.0.1:{port}/{names}"}
            runs: dict[str, list[float]] = {k: [] for k in specs}
            for r in range(args.rounds):
                for name, spec in specs.items():
                    runs[name].append(rate(spec, args.batches, args.batch, args.workers))
                    print(f"round {r + 1}: {name:>16}: {runs[name][-1]:7.1f} samples/s", flush=True)
        finally:
            server.terminate()
            server.wait()
    best = {k: max(v) for k, v in runs.items()}
    ratio = best["http (loopback)"] / best["local disk"]
    print("\n| source | samples/s (best of rounds) | all rounds |")
    print("|---|---:|---|")
    for k, v in runs.items():
        print(f"| {k} | {best[k]:.1f} | {', '.join(f'{x:.0f}' for x in v)} |")
    print(f"http / local: {ratio:.2f}x ({args.workers} workers, batch {args.batch}, prefetch 4, {args.side} px JPEGs)")
    write_results(
        args.output,
        {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "args": vars(args),
            "samples_per_s": runs,
            "ratio_best": ratio,
        },
    )


if __name__ == "__main__":
    main()
