"""Step time of every engine on one device: the single-process (DDP's) engine, DeepSpeed ZeRO-1/2/3 and FSDP2 at
world size 1, the same model, batch, precision and synthetic data, one after the other in this process.

At world size 1 nothing is communicated, so the figures show what each engine's bookkeeping costs around the
same forward and backward (ZeRO's flat partitions and hooks, FSDP's per-block unshard/reshard). Each engine
trains ``--steps`` timed steps after ``--warmup``; an engine that fails is recorded with its error.

    python benchmarks/engine_steps.py --model vit_b32 --batch 256 --precision bf16     # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import torch
from results_io import write_results  # (benchmarks/ is on sys.path when run as a script)

ENGINES = ["ddp", "zero1", "zero2", "zero3", "fsdp"]


def step_time(engine_name: str, args, device: torch.device) -> dict:
    from clipkit import model as model_lib
    from clipkit.bench import synthetic_batches
    from clipkit.cli import compose
    from clipkit.data.transforms import DeviceNormalize
    from clipkit.distributed import DistEnv, set_fp32_math
    from clipkit.engine import build_engine
    from clipkit.loss import build_loss
    from clipkit.metrics import peak_memory_gb, reset_peak_memory
    from clipkit.step import train_step

    overrides = [f"model={args.model}", f"parallel={engine_name}", f"train.precision={args.precision}"]
    cfg, _ = compose([*overrides, f"train.global_batch_size={args.batch}"])
    set_fp32_math(device, cfg.train.tf32)
    torch.manual_seed(0)
    built = model_lib.build(cfg.model, device)
    engine = build_engine(built.model, cfg, DistEnv(device=device))
    loss_fn = build_loss(cfg.loss.name, cfg.loss.impl, cfg.loss.chunk_size)
    normalize = DeviceNormalize(built.mean, built.std).to(device)
    batches = [
        (normalize(im.to(device)), tx.to(device))
        for im, tx in synthetic_batches(2, args.batch, built.image_size, built.context_length, seed=0)
    ]
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            reset_peak_memory(device)
            t0 = time.perf_counter()
        train_step(engine, loss_fn, [batches[i % 2]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / args.steps
    row = {"engine": engine_name, "step_s": seconds, "samples_per_s": args.batch / seconds}
    row["peak_mem_gb"] = peak_memory_gb(device)
    del engine, built, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b32", help="a model preset (conf/model)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--out", default="benchmarks/out/engine_steps.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from clipkit.distributed import DistEnv, ensure_process_group

    ensure_process_group(DistEnv(device=device), 600)  # (one group of one process for every engine)
    rows = []
    for name in args.engines:
        try:
            rows.append(step_time(name, args, device))
        except Exception as err:  # one engine's failure is a result, not the end of the run
            rows.append({"engine": name, "error": f"{type(err).__name__}: {err}"[:300]})
        print(rows[-1], flush=True)
    print(f"\n{args.model}, batch {args.batch}, {args.precision}, one {device.type} device")
    print("| engine | step s | samples/s | peak GB |\n|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | failed: {r['error'][:80]} | | |")
        else:
            print(f"| {r['engine']} | {r['step_s']:.4f} | {r['samples_per_s']:.0f} | {r['peak_mem_gb']:.2f} |")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    write_results(args.out, {"device": device_name, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
