"""Every GPU figure clipkit's goals name, in one run; writes one JSON and one Markdown table.

In order:
1. train step: samples/s, MFU, data-wait and peak memory, clipkit against open_clip's ``train_one_epoch`` on the
   same batches and precision (``clipkit bench``), bf16, for ViT-B/32 (batch 256 and 1024), ViT-B/16 (256) and
   ViT-L/14 (64); on synthetic data, then on real decoded shards (JPEG demo shards at 256 px, decoded by clipkit's
   loader with 12 workers);
2. the loss alone: forward + backward time and peak CUDA memory at global batch 4k-128k, gathered and tiled
   InfoNCE, SigLIP, open_clip's ClipLoss and SigLipLoss (``benchmarks/loss_memory.py``), as one rank of 8 and as
   one process on the whole batch;
3. ``train.compile=true`` against eager (ViT-B/16, batch 256).

Each measurement runs in its own process; one that fails (out of memory, a missing package) is recorded with its
error and the suite goes on. ``--quick`` runs a reduced set (one model, fewer steps) to check the plumbing.

    python benchmarks/gpu_suite.py --out benchmarks/out/gpu          # normally via benchmarks/gpu_suite.sh
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

TRAIN_STEP = [("vit_b32", 256), ("vit_b32", 1024), ("vit_b16", 256), ("vit_l14", 64)]
LOSS_BATCHES = [4096, 8192, 16384, 32768, 65536, 131072]


def run(cmd: list[str], log: Path) -> tuple[int, str]:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    print(f"  exit {proc.returncode} after {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return proc.returncode, tail


def bench(out: Path, name: str, overrides: list[str]) -> dict:
    result = out / f"{name}.json"
    cmd = [sys.executable, "-m", "clipkit", "bench", f"bench.output={result}", f"hydra.run.dir={out / 'runs' / name}"]
    rc, tail = run([*cmd, *overrides], out / f"{name}.log")
    if rc != 0 or not result.exists():
        return {"name": name, "overrides": overrides, "error": tail}
    return {"name": name, "overrides": overrides, **json.loads(result.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/gpu")
    ap.add_argument("--quick", action="store_true", help="one model, fewer steps and loss sizes (plumbing check)")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--parts", default="step,loss,compile", help="comma-separated subset of step, loss, compile")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = ["bench.steps=5", "bench.warmup=2"] if args.quick else ["bench.steps=30", "bench.warmup=10"]
    configs = TRAIN_STEP[:1] if args.quick else TRAIN_STEP
    real_data = [
        "bench.data=train",
        f"data.num_workers={args.workers}",
        "data.demo.image_size=256",
        f"data.demo.num_train={4000 if args.quick else 48000}",
        "data.demo.shard_size=2000",
        f"data.cache_dir={out / 'cache'}",
    ]
    previous = out / "gpu_suite.json"  # parts run in separate calls add up in one report
    report: dict = json.loads(previous.read_text()) if previous.exists() else {}
    report.update(
        {
            "machine": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "argv": sys.argv,
        }
    )
    for part, key in (("step", "train_step"), ("loss", "loss"), ("compile", "compile")):
        if part in parts or key not in report:
            report[key] = []
    try:
        import torch

        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
        report["torch"] = torch.__version__
    except ImportError:
        report["device"] = "unknown"

    def save() -> None:
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_suite.md").write_text(markdown(report))

    for data in ("synthetic", "train") if "step" in parts else ():
        for model, batch in configs:
            name = f"step-{model}-b{batch}-{data}"
            overrides = [f"model={model}", f"train.global_batch_size={batch}", "train.precision=bf16", *steps]
            report["train_step"].append(bench(out, name, overrides + (real_data if data == "train" else [])))
            save()

    batches = LOSS_BATCHES[:3] if args.quick else LOSS_BATCHES
    for world in (8, 1) if "loss" in parts else ():
        loss_json = out / f"loss-world{world}.json"
        cmd = [sys.executable, "benchmarks/loss_memory.py", "--device", "cuda", "--world", str(world)]
        cmd += ["--batches", *map(str, batches), "--max-mem-gib", "60", "--out", str(loss_json)]
        rc, tail = run(cmd, out / f"loss-world{world}.log")
        rows = json.loads(loss_json.read_text())["rows"] if loss_json.exists() else [{"error": tail}]
        report["loss"] += [{**r, "world": world} for r in rows]
        save()

    model, batch = ("vit_b32", 256) if args.quick else ("vit_b16", 256)
    for compiled in (False, True) if "compile" in parts else ():
        name = f"compile-{model}-b{batch}-{'on' if compiled else 'off'}"
        overrides = [f"model={model}", f"train.global_batch_size={batch}", "train.precision=bf16", *steps]
        overrides += ["bench.baseline=false", f"train.compile={str(compiled).lower()}"]
        report["compile"].append(bench(out, name, overrides))
        save()
    save()
    print("\n" + markdown(report))
    print(f"\nwritten to {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")


def markdown(r: dict) -> str:
    lines = [f"GPU suite on {r.get('device')} (torch {r.get('torch')}), {r['date']}", ""]
    lines += [
        "| train step | data | clipkit samples/s | MFU | data-wait | peak GB | open_clip samples/s | MFU | peak GB "
        "| clipkit / open_clip |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["train_step"]:
        label = row["name"].removeprefix("step-")
        data = "real shards" if label.endswith("-train") else "synthetic"
        if "error" in row:
            lines.append(f"| {label} | {data} | failed: {row['error']} |||||||")
            continue
        ck, oc = row["results"]["clipkit"], row["results"].get("open_clip", {})
        lines.append(
            f"| {row['model']} b{row['batch']} | {data} | {ck['samples_per_s']:.0f} | {100 * ck['mfu']:.1f}% "
            f"| {ck['data_wait_pct']:.1f}% | {ck['peak_mem_gb']:.1f} | {oc.get('samples_per_s', 0):.0f} "
            f"| {100 * oc.get('mfu', 0):.1f}% | {oc.get('peak_mem_gb', 0):.1f} | {row.get('speedup', 0):.2f}x |"
        )
    lines += ["", "| loss (fwd+bwd) | world | global batch | peak MiB | time s |", "|---|---:|---:|---:|---:|"]
    for row in r["loss"]:
        if "skipped" in row or "error" in row:
            reason = row.get("skipped") or row.get("error")
            lines.append(f"| {row.get('impl', '?')} | {row['world']} | {row.get('global_batch', '')} | {reason} | |")
        else:
            lines.append(
                f"| {row['impl']} | {row['world']} | {row['global_batch']} | {row['peak_loss_mem_MiB']:.0f} "
                f"| {row['time_s']:.4f} |"
            )
    lines += ["", "| torch.compile | samples/s | MFU | peak GB |", "|---|---:|---:|---:|"]
    for row in r["compile"]:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} | | |")
            continue
        ck = row["results"]["clipkit"]
        rate, mfu, mem = ck["samples_per_s"], 100 * ck["mfu"], ck["peak_mem_gb"]
        lines.append(f"| {row['name']} | {rate:.0f} | {mfu:.1f}% | {mem:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
