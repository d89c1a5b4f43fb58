"""Image-text matching (``loss.itm_weight``) on the demo data: the demo recipe with and without the ITM term, real
``clipkit train`` runs (their own process, one at a time, the demo's end-of-run eval), then ``clipkit eval`` of the
ITM runs' checkpoints re-ranking the top k by the head for each k of ``--ks``.

Reported per run: zero-shot top-1, retrieval R@1 / R@5 both ways, plain and (ITM runs) re-ranked, the head's
accuracy on the last logged step's pairs, and the median step time over the logged intervals (loader
included). Prints a table, writes JSON.

    python benchmarks/itm.py --steps 1400 --weights 1 0.3 --ks 4 16
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
from lora import train  # noqa: E402  (one clipkit train run: its eval, step time, checkpoint size)
from results_io import write_results  # noqa: E402

DIRECTIONS = ("image_to_text", "text_to_image")


def reranked(run_dir: Path, k: int) -> dict:
    """``clipkit eval`` of the run's checkpoint with the top ``k`` re-ranked by its ITM head."""
    out = run_dir / f"eval_k{k}.json"
    cmd = [sys.executable, "-m", "clipkit", "eval", f"checkpoint={run_dir}", f"eval.retrieval.itm_k={k}",
           "eval.zeroshot.dataset=", f"eval.output={out}", "logging.progress=false"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res = json.loads(out.read_text())["eval"]["retrieval"]
    return {f"{d}_R@{n}": res[f"itm_{d}_R@{n}"] for d in DIRECTIONS for n in (1, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1400, help="the demo recipe's own budget by default")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0], help="loss.itm_weight of the ITM runs")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16], help="eval.retrieval.itm_k to re-rank with")
    parser.add_argument("--out", default="benchmarks/out/itm_demo.json")
    args = parser.parse_args()
    common = [f"train.global_batch_size={args.batch}", f"train.seed={args.seed}", f"train.steps={args.steps}",
              "train.log_every=20", f"train.checkpoint_every={args.steps}", "eval.retrieval.itm_k=0"]  # fmt: skip
    runs = {}
    with tempfile.TemporaryDirectory(prefix="clipkit-itm-") as tmp:
        for weight in [0.0, *args.weights]:
            name = "contrastive only" if weight == 0 else f"loss.itm_weight={weight:g}"
            run_dir = Path(tmp) / f"w{weight:g}"
            r = train(run_dir, [*common, f"loss.itm_weight={weight}"])
            summary = json.loads((run_dir / "summary.json").read_text())["eval"]["retrieval"]
            r.update({f"{d}_R@5": summary[f"{d}_R@5"] for d in DIRECTIONS})
            if weight:
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                r["itm_accuracy"] = [x["itm_accuracy"] for x in records if "itm_accuracy" in x][-1]
                r["reranked"] = {k: reranked(run_dir, k) for k in args.ks}
            runs[name] = r
            print(f"{name}: {r}", flush=True)
    print(f"\ndemo data, {args.steps} steps, batch {args.batch}, seed {args.seed}\n")
    print("| run | zero-shot top-1 | i->t R@1 / R@5 | t->i R@1 / R@5 | ITM accuracy | step ms |")
    print("|---|---:|---:|---:|---:|---:|")

    def recalls(res: dict, d: str) -> str:
        return f"{100 * res[f'{d}_R@1']:.1f}% / {100 * res[f'{d}_R@5']:.1f}%"

    for name, r in runs.items():
        plain = {**r, "image_to_text_R@1": r["image_to_text_r1"], "text_to_image_R@1": r["text_to_image_r1"]}
        acc = f"{100 * r['itm_accuracy']:.1f}%" if "itm_accuracy" in r else ""
        print(f"| {name} | {100 * r['zeroshot_top1']:.1f}% | {recalls(plain, DIRECTIONS[0])} "
              f"| {recalls(plain, DIRECTIONS[1])} | {acc} | {r['step_ms']:.0f} |")  # fmt: skip
        for k, res in r.get("reranked", {}).items():
            i2t, t2i = recalls(res, DIRECTIONS[0]), recalls(res, DIRECTIONS[1])
            print(f"| ... top {k} re-ranked by ITM | | {i2t} | {t2i} | | |")
    meta = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "cpu_count": os.cpu_count()}
    write_results(args.out, {**meta, **vars(args), "runs": runs})


if __name__ == "__main__":
    main()
