"""``train.stages`` at equal wall time: one run at the model's size against a staged run (most steps at a smaller
size, then the model's) given more steps, on the demo data. Each run is a real ``clipkit train`` (its own process,
one at a time); what a run cost is its ``summary.json``'s ``train_time_s`` (first step to the end of the final
eval), what it reached its end-of-run zero-shot top-1 and retrieval R@1 on the demo's held-out splits.

The default is the demo's world drawn at 72 px and ``clipkit-tiny-64`` (clipkit-tiny's architecture at 64 px,
8 px patches: an 8 x 8 grid), so that the small stage (32 px, a 4 x 4 grid) still shows the demo's shapes; the
demo's own 32 px model drawn at 16 px keeps 2 x 2 patches, too few for its shapes (see RESULTS.md).
Prints a table, writes JSON.

    python benchmarks/stages.py --seeds 0 1          # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402


def run(name: str, folder: Path, overrides: list[str]) -> dict:
    run_dir = folder / name
    cmd = [sys.executable, "-m", "clipkit", "train", f"hydra.run.dir={run_dir}", "logging.progress=false",
           "logging.report=false", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    zs, rt = summary["eval"]["zeroshot"], summary["eval"]["retrieval"]
    return {
        "run": name,
        "command": "clipkit train " + " ".join(overrides),
        "steps": summary["step"],
        "train_time_s": round(summary["train_time_s"], 1),
        "wall_s": round(wall, 1),
        "zeroshot_top1": zs["acc1"],
        "zeroshot_top5": zs["acc5"],
        "i2t_R@1": rt["image_to_text_R@1"],
        "t2i_R@1": rt["text_to_image_R@1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clipkit-tiny-64", help="model.name (its size is the last stage's)")
    parser.add_argument("--data-size", type=int, default=72, help="the demo images' side (the crops come from it)")
    parser.add_argument("--single-steps", type=int, default=400)
    parser.add_argument("--staged-steps", type=int, default=750, help="chosen so that both take the same time")
    parser.add_argument("--stages", default="[80%:32,rest:64]")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="benchmarks/out/stages.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        common = [f"model.name={args.model}", f"data.demo.image_size={args.data_size}",
                  f"optim.warmup_steps={args.warmup}"]  # fmt: skip
        for seed in args.seeds:
            seeded = [*common, f"train.seed={seed}"]
            rows.append(run(f"single_s{seed}", folder, [*seeded, f"train.steps={args.single_steps}"]))
            staged = [*seeded, f"train.steps={args.staged_steps}", f"train.stages={args.stages}"]
            rows.append(run(f"staged_s{seed}", folder, staged))
    print(f"\n{'run':<12} {'steps':>6} {'train s':>8} {'top-1':>7} {'top-5':>7} {'i2t R@1':>8} {'t2i R@1':>8}")
    for r in rows:
        print(f"{r['run']:<12} {r['steps']:>6} {r['train_time_s']:>8.1f} {100 * r['zeroshot_top1']:>6.1f}% "
              f"{100 * r['zeroshot_top5']:>6.1f}% {100 * r['i2t_R@1']:>7.1f}% {100 * r['t2i_R@1']:>7.1f}%")  # fmt: skip
    write_results(args.out, {"args": vars(args), "runs": rows})


if __name__ == "__main__":
    main()
