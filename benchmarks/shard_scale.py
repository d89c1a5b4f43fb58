"""Planning at scale: time to first batch and extra memory per rank for shard specs of 10^3 to 10^6 shards.

Each spec is ``DIR/{0000000..N-1}.tar`` with a ``sizes.json`` listing all N shards (LAION-2B-en has 231k shards).
The shards are symlinks to one real 16-sample shard, so every shard the first batch opens exists and is read
for real; what is measured is clipkit's own cost: expanding the spec (brace expansion, one stat per shard),
reading sizes.json, planning every slot, shipping the plan to 2 fork-server workers, and the first batch of
rank 0 of a 64-rank job. Each size runs in a fresh process; memory is resident-set growth of that process
from before the spec is touched to after the first batch (and the workers' resident sets, which hold the plan).

    python benchmarks/shard_scale.py                 # 10^3 .. 10^6
    python benchmarks/shard_scale.py --max-exp 5
Goal (issue 13): under 10 s and under 1 GB at 10^6 shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_SHARD = 16


def _tiny_jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (seed * 37 % 256, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def build(root: Path, num: int) -> str:
    """``num`` shard names (symlinks to one real shard) and their sizes.json; returns the spec."""
    from clipkit.data.writer import write_shard

    real = root / "real.tar"
    if not real.exists():
        write_shard(real, [{"__key__": f"k{i:03d}", "jpg": _tiny_jpeg(i), "txt": f"caption {i}"} for i in range(16)])
    width = 7
    sizes = {}
    for i in range(num):
        name = f"{i:0{width}d}.tar"
        path = root / name
        if not path.exists():
            os.symlink(real, path)
        sizes[name] = PER_SHARD
    (root / "sizes.json").write_text(json.dumps(sizes))
    return f"{root}/{{{0:0{width}d}..{num - 1:0{width}d}}}.tar"


def measure(spec: str) -> dict:
    """Runs in a fresh process: spec -> plan -> first batch of rank 0 of 64 ranks, 2 workers."""
    import open_clip

    from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards, worker_context
    from clipkit.metrics import resident_memory_gb

    worker_context(start=True)  # as `clipkit train` does while it builds the model
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    # A one-shard loader first: the fork server has imported torch (a real run does that while it builds the
    # model), so the figures below are clipkit's own cost for the big spec.
    warm_spec = spec.split("{")[0] + "real.tar"
    warm = TrainLoader(
        *resolve_shards(warm_spec),
        SampleDecoder(("jpg",), "auto", 32, (0.9, 1.0), 0),
        tokenizer,
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=2,
        batch_size=4,
        window=0,
    )
    next(warm)
    warm.close()
    rss0 = resident_memory_gb()
    t0 = time.perf_counter()
    shards, weights = resolve_shards(spec)
    t_resolve = time.perf_counter() - t0
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "auto", 32, (0.9, 1.0), 0),
        tokenizer,
        mode="epoch",
        seed=0,
        rank=0,
        world_size=64,
        num_workers=2,
        batch_size=64,
        window=1000,
    )
    t_plan = time.perf_counter() - t0
    batch = next(loader)
    t_first = time.perf_counter() - t0
    workers = [w.pid for w in loader._iter._workers]  # (RSS includes torch's pages shared with the fork server)
    worker_gb = []
    for pid in workers:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                worker_gb.append(int(line.split()[1]) / 1024**2)
    rss1 = resident_memory_gb()
    loader.close()
    assert batch["image"].shape[0] == 64
    return {
        "num_shards": len(shards),
        "resolve_s": t_resolve,
        "plan_s": t_plan,
        "first_batch_s": t_first,
        "extra_rss_gb": rss1 - rss0,
        "worker_rss_gb": max(worker_gb),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-exp", type=int, default=3)
    ap.add_argument("--max-exp", type=int, default=6)
    ap.add_argument("--output", default="benchmarks/out/shard_scale.json")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipkit-scale-") as tmp:
        for exp in range(args.min_exp, args.max_exp + 1):
            root = Path(tmp) / f"e{exp}"
            root.mkdir()
            spec = build(root, 10**exp)
            out = subprocess.run(
                [sys.executable, __file__, "--measure", spec], capture_output=True, text=True, timeout=1200
            )
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{r['num_shards']:>9,} shards: resolve {r['resolve_s']:6.2f} s, plan {r['plan_s']:6.2f} s, "
                f"first batch {r['first_batch_s']:6.2f} s, +{r['extra_rss_gb'] * 1024:7.1f} MiB (rank), "
                f"worker {r['worker_rss_gb'] * 1024:6.1f} MiB",
                flush=True,
            )
    print("\n| shards | spec + sizes.json | + plan | first batch | extra memory (rank) | worker RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['num_shards']:,} | {r['resolve_s']:.2f} s | {r['plan_s']:.2f} s | {r['first_batch_s']:.2f} s "
            f"| {r['extra_rss_gb'] * 1024:.0f} MiB | {r['worker_rss_gb'] * 1024:.0f} MiB |"
        )
    sys.path.insert(0, str(Path(__file__).parent))
    from results_io import write_results

    write_results(
        args.output,
        {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows},
    )


if __name__ == "__main__":
    main()
