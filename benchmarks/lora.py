"""LoRA against full fine-tuning on the demo data: from one base run, ``--steps`` more steps of each, real
``clipkit train`` runs (their own process, one at a time, the demo's end-of-run eval).

The base is the demo recipe cut to ``--base-steps``; each fine-tune starts from it (``model.init_from``) with a
short warmup. Reported per run: zero-shot top-1 and retrieval R@1 (the demo's eval sets), trainable parameters,
the median step time over the logged intervals (loader included), and the size of one checkpoint (what
``checkpoints/step_*`` holds: LoRA leaves the frozen weights out). Prints a table, writes JSON.

    python benchmarks/lora.py --base-steps 600 --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402


def train(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "clipkit", "train", f"hydra.run.dir={run_dir}", "logging.progress=false",
           "logging.report=false", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    batch = int(next(o.split("=")[1] for o in overrides if o.startswith("train.global_batch_size=")))
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    trainable = re.search(r"([\d.]+)M of ([\d.]+)M params trainable", proc.stderr)
    ev = summary["eval"]
    return {
        "command": "clipkit train " + " ".join(overrides),
        "zeroshot_top1": ev["zeroshot"]["acc1"],
        "image_to_text_r1": ev["retrieval"]["image_to_text_R@1"],
        "text_to_image_r1": ev["retrieval"]["text_to_image_R@1"],
        "trainable_m": float(trainable[1]) if trainable else None,
        "step_ms": round(1000 * batch / statistics.median(rates[2:]), 1),
        "checkpoint_mb": round(sum(p.stat().st_size for p in newest.rglob("*") if p.is_file()) / 1e6, 2),
        "train_time_s": round(summary["train_time_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/lora_demo.json")
    args = parser.parse_args()
    common = [f"train.global_batch_size={args.batch}", f"train.seed={args.seed}", "train.log_every=20"]
    tune = [*common, f"train.steps={args.steps}", "optim.warmup_steps=50", f"train.checkpoint_every={args.steps}"]
    with tempfile.TemporaryDirectory(prefix="clipkit-lora-") as tmp:
        base = Path(tmp) / "base"
        runs = {"base": train(base, [*common, f"train.steps={args.base_steps}", "optim.warmup_steps=200"])}
        init = f"model.init_from={base}"
        variants = {
            "full fine-tune, lr 7e-4": [*tune, init],
            "LoRA r=8, lr 1e-3": [*tune, init, "model.lora.rank=8", "optim.lr=1e-3"],
            "LoRA r=8, lr 3e-3": [*tune, init, "model.lora.rank=8", "optim.lr=3e-3"],
            "LoRA r=32, lr 3e-3": [*tune, init, "model.lora.rank=32", "optim.lr=3e-3"],
        }
        for name, overrides in variants.items():
            runs[name] = train(Path(tmp) / re.sub(r"\W+", "_", name), overrides)
            print(f"{name}: {runs[name]}", flush=True)
    print(f"\ndemo data, batch {args.batch}, seed {args.seed}; base {args.base_steps} steps, then {args.steps}\n")
    print("| run | zero-shot top-1 | R@1 image->text / text->image | trainable | step ms | checkpoint MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        trainable = f"{r['trainable_m']:.3f}M" if r["trainable_m"] is not None else "all"
        retrieval = f"{100 * r['image_to_text_r1']:.1f}% / {100 * r['text_to_image_r1']:.1f}%"
        print(f"| {name} | {100 * r['zeroshot_top1']:.1f}% | {retrieval} | {trainable} | {r['step_ms']:.0f} "
              f"| {r['checkpoint_mb']:.2f} |")  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "cpu_count": os.cpu_count()}
    write_results(args.out, {**meta, **vars(args), "runs": runs})


if __name__ == "__main__":
    main()
