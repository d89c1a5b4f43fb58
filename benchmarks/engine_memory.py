"""Per-rank model-state memory (parameters + gradients + optimizer state) of every engine, measured, against the
scale model's prediction (``benchmarks/scale_model.py``: fp32 weights 4, grads 4, AdamW moments 8 bytes per
parameter, divided by the world size where the engine partitions them).

Each configuration runs as its own torchrun job on CPU (gloo): the real open_clip model, clipkit's engine, one
training step of a tiny batch (so the optimizer state exists), then the forward/backward of a second step and,
before its update, the process's resident memory (after ``malloc_trim``) minus what it was before the model's
weights existed. Activations are freed by then, so what is counted is the model state plus whatever the engine
keeps (DDP's gradient buckets, DeepSpeed's flat fp32 partitions and reduce buckets, FSDP's unsharded buffers);
a Python-level tensor count would miss the tensors only C++ holds (``.grad``, DDP's buckets). Prints a table,
writes JSON.

    python benchmarks/engine_memory.py --models ViT-B-16 ViT-L-14 --worlds 2 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ["ddp", "zero1", "zero2", "zero3", "fsdp"]
GB = 1e9


def predicted(engine: str, params: int, world: int) -> float:
    """The scale model's bytes per rank (FSDP shards like ZeRO-3)."""
    per = {
        "ddp": 16 * params,
        "zero1": 8 * params + 8 * params / world,
        "zero2": 4 * params + 12 * params / world,
        "zero3": 16 * params / world,
        "fsdp": 16 * params / world,
    }
    return per[engine] / GB


def resident_bytes() -> int:
    """This process's resident memory after handing freed heap pages back to the OS (glibc ``malloc_trim``)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def worker(model_name: str, engine: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from clipkit import model as model_lib
    from clipkit.config import RootConfig
    from clipkit.distributed import init
    from clipkit.engine import build_engine
    from clipkit.loss import build_loss
    from clipkit.step import forward_backward, train_step

    env = init("cpu")
    torch.manual_seed(0)
    cfg = RootConfig()
    cfg.model.name, cfg.parallel.engine, cfg.train.precision = model_name, engine, "fp32"
    cfg.train.global_batch_size = 2 * env.world_size
    built = model_lib.build(cfg.model)
    params = sum(p.numel() for p in built.model.parameters())
    base = resident_bytes() - 4 * params  # the process without the fp32 weights (libraries, buffers, ...)
    eng = build_engine(built.model, cfg, env)
    loss_fn = build_loss("infonce", "gathered", "auto")
    size, ctx = built.image_size, built.context_length
    batch = [(torch.randn(2, 3, size, size), torch.randint(1, 1000, (2, ctx)))]
    train_step(eng, loss_fn, batch)  # the optimizer state now exists
    forward_backward(eng, loss_fn, batch)
    state = resident_bytes() - base  # params + grads + optimizer state + engine buffers, before the update
    eng.step()
    rows = [None] * env.world_size
    dist.all_gather_object(rows, state)
    if env.rank == 0:
        Path(out).write_text(json.dumps({"params": params, "per_rank_bytes": rows}))
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--max-gb", type=float, default=20.0, help="skip jobs whose predicted total exceeds this")
    ap.add_argument("--out", default="benchmarks/out/engine_memory.json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    sizes = {"ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513}  # parameter counts, for the fit check only
    rows = []
    for model in args.models:
        for world in args.worlds:
            for engine in args.engines:
                # Every rank first builds the whole fp32 model; DDP then holds all of its state on every rank.
                need = world * (4 * sizes.get(model, 0) / GB + predicted(engine, sizes.get(model, 0), world))
                row = {"model": model, "world": world, "engine": engine}
                if need > args.max_gb:
                    rows.append({**row, "skipped": f"~{need:.0f} GB for {world} ranks > --max-gb {args.max_gb:.0f}"})
                    print(f"{model} {engine} x{world}: skipped ({rows[-1]['skipped']})", flush=True)
                    continue
                tmp = Path(args.out).with_suffix(f".{model}.{engine}.{world}.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
                cmd += ["--master_port", str(free_port()), __file__, "--worker", model, engine, str(tmp)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if proc.returncode != 0 or not tmp.exists():
                    errors = [x for x in proc.stderr.splitlines() if "Error" in x or "Killed" in x or "exitcode" in x]
                    rows.append({**row, "skipped": "failed: " + (errors or ["see stderr"])[-1].strip()[:120]})
                    print(f"{model} {engine} x{world}: failed: {rows[-1]['skipped']}", flush=True)
                    continue
                got = json.loads(tmp.read_text())
                tmp.unlink()
                measured = max(got["per_rank_bytes"]) / GB
                pred = predicted(engine, got["params"], world)
                rows.append({**row, "params": got["params"], "measured_gb": measured, "predicted_gb": pred})
                print(
                    f"{model} {engine} x{world}: measured {measured:.2f} GB per rank, predicted {pred:.2f} "
                    f"({measured / pred:.2f}x; {time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    print("\n| model | ranks | engine | measured GB/rank | scale model GB/rank | measured / model |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['world']} | {r['engine']} | {r['skipped']} | | |")
        else:
            ratio = r["measured_gb"] / r["predicted_gb"]
            print(f"| {r['model']} | {r['world']} | {r['engine']} | {r['measured_gb']:.2f} | {r['predicted_gb']:.2f} "
                  f"| {ratio:.2f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.out).write_text(json.dumps(meta, indent=1))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
