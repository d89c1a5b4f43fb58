"""What cached tower features save: the step time of runs that feed a frozen tower its inputs every step against
runs that read its cached embeddings (the first of which builds the cache), for
  - LiT (``data.cache_image_features``): ``--model`` with its image tower locked;
  - distillation (``data.cache_teacher_features``): a ``--student`` distilled from the first LiT run as teacher.

Each run is a real ``clipkit train`` on the demo data (its own process, one at a time, loader workers as the
defaults pick, no eval), with ``data.crop_scale_min=1`` in every run. Reported per run: the median step time over
the logged intervals after the first ``--skip`` (the loader's throughput included), the cache build time, and
``train_time_s`` (first step to the end). Prints a table, writes JSON.

    python benchmarks/feature_cache.py --model clipkit-small --student clipkit-tiny --steps 150
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402


def run(name: str, folder: Path, overrides: list[str], batch: int, skip: int) -> dict:
    run_dir = folder / name
    cmd = [sys.executable, "-m", "clipkit", "train", f"hydra.run.dir={run_dir}", "logging.progress=false",
           "logging.report=false", "eval.zeroshot.dataset=", "eval.retrieval.dataset=", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    rates = [r["samples_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "samples_per_s" in r]  # fmt: skip
    cached = (summary.get("cached_features") or {}).values()
    return {
        "run": name,
        "command": "clipkit train " + " ".join(overrides),
        "steps": summary["step"],
        "step_ms": round(1000 * batch / statistics.median(rates[skip:]), 1),
        "cache_build_s": round(sum(c["seconds"] for c in cached), 1),
        "cache_embedded_shards": sum(c["embedded"] for c in cached),
        "train_time_s": round(summary["train_time_s"], 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clipkit-small")
    parser.add_argument("--student", default="clipkit-tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2, help="logged intervals left out of the median (start-up)")
    parser.add_argument("--out", default="benchmarks/out/feature_cache.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipkit-feature-cache-") as tmp:
        folder = Path(tmp)
        common = ["data.crop_scale_min=1", f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
                  f"train.log_every={args.log_every}", f"optim.warmup_steps={min(50, args.steps // 4)}",
                  f"data.feature_cache_dir={folder / 'cache'}"]  # fmt: skip
        lit = [*common, f"model.name={args.model}", "model.lock_image=true"]
        distill = [*common, f"model.name={args.student}", f"distill.teacher={folder / 'lit-images'}"]
        cached_lit = [*lit, "data.cache_image_features=true"]
        cached_teacher = [*distill, "data.cache_teacher_features=true"]
        runs = [
            ("lit-images", "LiT: images", lit),
            ("lit-build", "LiT: cached image features, first run (builds)", cached_lit),
            ("lit-reuse", "LiT: cached image features, later run", cached_lit),
            ("distill-teacher", "distillation: the teacher runs", distill),
            ("distill-build", "distillation: cached teacher, first run (builds)", cached_teacher),
            ("distill-reuse", "distillation: cached teacher, later run", cached_teacher),
        ]  # fmt: skip
        rows = []
        for name, described, overrides in runs:
            rows.append({**run(name, folder, overrides, args.batch, args.skip), "run": described})
            print(rows[-1], flush=True)
    print(f"\nLiT: {args.model}; distillation: {args.student} from it; global batch {args.batch}, {args.steps} steps, "
          f"demo data, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| run | step ms | vs uncached | cache build s | train_time_s | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = rows[0 if r["run"].startswith("LiT") else 3]["step_ms"]
        print(f"| {r['run']} | {r['step_ms']:.0f} | {r['step_ms'] / ref:.2f}x | {r['cache_build_s']:.1f} "
              f"| {r['train_time_s']:.1f} | {r['wall_s']:.1f} |")  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "cpu_count": os.cpu_count()}
    write_results(args.out, {**meta, "model": args.model, "student": args.student, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
