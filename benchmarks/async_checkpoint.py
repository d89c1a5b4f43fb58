"""How long a checkpoint holds up the step loop, synchronous against ``train.async_checkpoint=true`` (FSDP).

Two torchrun jobs (CPU/gloo here; the same on GPUs) train the same steps with a checkpoint every
``--every`` steps, one saving synchronously, one in the background. ``checkpoint_s`` in ``metrics.jsonl`` is the
time the loop spent in saves since the previous log record; with ``train.log_every=1`` it is per save. Also the
median step time of steps without a save, and of the step right after one (which shares the machine with the
background write). Prints a table, writes JSON.

    python benchmarks/async_checkpoint.py --model ViT-B-32 --batch 8 --steps 12 --every 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import write_results  # noqa: E402


def run(args, asynchronous: bool, root: Path) -> dict:
    run_dir = root / ("async" if asynchronous else "sync")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}", "--master_port"]
    cmd += [str(29500 + asynchronous), "-m", "clipkit", "train", f"hydra.run.dir={run_dir}", "parallel=fsdp"]
    cmd += [
        f"model.name={args.model}",
        f"train.async_checkpoint={str(asynchronous).lower()}",
        f"train.steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        f"train.checkpoint_every={args.every}",
        "train.keep_last=2",
        "train.log_every=1",
        "train.precision=fp32",
        "data.num_workers=1",
        f"data.demo.num_train={max(512, args.batch * args.steps)}",
        "eval.zeroshot.dataset=",
        "eval.retrieval.dataset=",
        "logging.progress=false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # samples_per_s is a running rate; the step time comes from consecutive records' wall clock instead.
    saves = [r["checkpoint_s"] for r in steps if r["step"] - 1 > 0 and (r["step"] - 1) % args.every == 0]
    return {
        "async": asynchronous,
        "wall_s": time.perf_counter() - t0,
        "checkpoint_s_per_save": saves,
        "mean_checkpoint_s": statistics.mean(saves) if saves else None,
        "final_loss": steps[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/async_checkpoint.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args, a, Path(tmp)) for a in (False, True)]
    print(f"\nFSDP, {args.model}, {args.ranks} ranks, batch {args.batch}, a checkpoint every {args.every} steps")
    print("| save | loop held up per save (s) | mean | whole run (s) | final loss |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        per = ", ".join(f"{x:.2f}" for x in r["checkpoint_s_per_save"])
        print(
            f"| {'async' if r['async'] else 'sync'} | {per} | {r['mean_checkpoint_s']:.2f} | {r['wall_s']:.0f} "
            f"| {r['final_loss']:.6f} |"
        )
    write_results(args.out, {"argv": sys.argv, "date": time.strftime("%Y-%m-%d"), "rows": rows})


if __name__ == "__main__":
    main()
