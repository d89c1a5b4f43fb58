"""``clipkit embed`` throughput on the CPU: samples/s of the whole command (read, decode, preprocess, embed both
towers, write), per loader worker count, on photo-like JPEG shards (~256 px sources, the tiny model's 32 px input).

A model is trained for one step first (any checkpoint will do: the cost does not depend on the weights). Each
worker count runs ``clipkit embed`` into a fresh folder; the figure is ``summary.json``'s samples/s.

    python benchmarks/embed_throughput.py --num-images 2000 --workers 0 1 2
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

from loader_throughput import make_shards
from results_io import write_results  # (benchmarks/ is on sys.path when run as a script)

QUIET = ["logging.progress=false", "logging.report=false", "eval.zeroshot.dataset=", "eval.retrieval.dataset="]


def clipkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "clipkit", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"clipkit {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default="benchmarks/out/embed_throughput.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = make_shards(tmp / "shards", 256, args.num_images)
        run = tmp / "run"
        clipkit("train", f"hydra.run.dir={run}", f"model={args.model}", f"data.train={spec}", "train.steps=1",
                "train.global_batch_size=16", *QUIET)  # fmt: skip
        for workers in args.workers:
            out = tmp / f"emb{workers}"
            t0 = time.perf_counter()
            clipkit("embed", f"checkpoint={run}", f"data.train={spec}", f"out={out}", f"data.num_workers={workers}")
            wall = time.perf_counter() - t0
            summary = json.loads((out / "summary.json").read_text())
            rows.append(
                {
                    "workers": workers,
                    "samples": summary["this_run"]["samples"],
                    "samples_per_s": summary["samples_per_s_rank0"],
                    "command_wall_s": wall,
                }
            )
            print(rows[-1], flush=True)
    print(f"\nclipkit embed, {args.model}, {args.num_images} photo-like JPEGs (~256 px), {os.cpu_count()} cores")
    print("| loader workers | samples/s (embedding loop) | whole command, s |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['samples_per_s']:.0f} | {r['command_wall_s']:.1f} |")
    meta = {"machine": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    write_results(args.out, {**meta, "model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
