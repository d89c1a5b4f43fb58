"""What locking a tower (LiT, ``model.lock_image`` / ``model.lock_text``) or training LoRA adapters instead of the
weights (``model.lora.*``) saves: step time, memory and checkpoint size of clipkit's engine, with and without.

Each configuration runs in its own process (so that peak memory is its own): the real open_clip model, clipkit's
locks and single-process engine, ``--warmup`` steps and then ``--steps`` timed steps of a synthetic batch.
Reported per configuration:
  - trainable parameters, and the model state they cost (fp32 weights of every parameter; gradients and the two
    AdamW moments of the trainable ones only), counted from the tensors the optimizer holds after the steps;
  - the median step time (forward, backward, update), also with gradient caching (K micro-batches: a locked
    tower's cached embeddings are not re-forwarded);
  - peak memory of the step: CUDA ``max_memory_allocated``; on CPU the process's peak resident memory (``ru_maxrss``)
    minus what it held before the first step (the model built, optimizer empty);
  - what a checkpoint holds: the weights the engine saves (LoRA: all but the frozen ones) and the AdamW moments.
Prints a table, writes JSON.

    python benchmarks/locked_towers.py --model ViT-B-32 --batch 64
    python benchmarks/locked_towers.py --configs unlocked "lora r=8" "lora r=8, mlp only" --out benchmarks/out/lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402

CONFIGS = {  # name -> (model.* lock settings, micro-batches per step: > 1 is gradient caching)
    "unlocked": ([], 1),
    "lock_image": (["lock_image"], 1),
    "lock_image, last 2 groups open": (["lock_image", "lock_image_unlocked_groups=2"], 1),
    "lock_text": (["lock_text"], 1),
    "unlocked, 4 micro-batches": ([], 4),
    "lock_image, 4 micro-batches": (["lock_image"], 4),
    # LoRA adapters on both towers' blocks (random base weights: what is timed does not depend on their values)
    "lora r=8": (["lora.rank=8"], 1),
    "lora r=8, mlp only": (["lora.rank=8", "lora.targets=mlp"], 1),
    "lora r=8, 4 micro-batches": (["lora.rank=8"], 4),
}
GB = 1e9


def worker(model_name: str, config: str, batch: int, warmup: int, steps: int, out: str) -> None:
    import torch

    from clipkit import lora
    from clipkit import model as model_lib
    from clipkit.config import RootConfig
    from clipkit.distributed import init
    from clipkit.engine import build_engine
    from clipkit.loss import build_loss
    from clipkit.step import train_step

    env = init("auto")
    cuda = env.device.type == "cuda"
    torch.manual_seed(0)
    cfg = RootConfig()
    cfg.model.name, cfg.train.global_batch_size = model_name, batch
    cfg.train.precision = "bf16" if cuda else "fp32"
    locks, micro = CONFIGS[config]
    for item in locks:
        key, _, value = item.partition("=")
        if key == "lora.targets":
            cfg.model.lora.targets = [value]
        elif key.startswith("lora."):
            setattr(cfg.model.lora, key.removeprefix("lora."), int(value))
        else:
            setattr(cfg.model, key, int(value) if value else True)
    cfg.model.lora.validate()
    if not cfg.model.lora.on:  # (LoRA's check asks for pretrained weights; the timing needs none)
        cfg.model.validate()
    built = model_lib.build(cfg.model, env.device)
    model_lib.apply_locks(built.model, cfg.model)
    lora.apply(built.model, cfg.model.lora)
    engine = build_engine(built.model, cfg, env)
    loss_fn = build_loss("infonce", "gathered", "auto")
    size, ctx = built.image_size, built.context_length
    gen = torch.Generator().manual_seed(0)
    per = batch // micro
    data = [
        [
            (torch.randn(per, 3, size, size, generator=gen), torch.randint(1, 40000, (per, ctx), generator=gen))
            for _ in range(micro)
        ]
        for _ in range(2)
    ]
    data = [[(i.to(env.device), t.to(env.device)) for i, t in step] for step in data]
    built.model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(engine, loss_fn, data[i % 2])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = list(built.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizer_state = sum(t.numel() * t.element_size() for s in engine.optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
    state = sum(4 * p.numel() for p in params) + sum(4 * p.numel() for p in trainable) + optimizer_state
    saved = lora.saved_weights(built.model, built.model.state_dict())
    checkpoint = sum(t.numel() * t.element_size() for t in saved.values()) + optimizer_state
    row = {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in trainable),
        "model_state_gb": state / GB,
        "step_ms": 1000 * statistics.median(times[warmup:]),
        "peak_gb": (peak - before) / GB,
        "checkpoint_gb": checkpoint / GB,
        "device": str(env.device),
    }
    Path(out).write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS)[:6], choices=list(CONFIGS))
    ap.add_argument("--out", default="benchmarks/out/locked_towers.json")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, config, batch, warmup, steps, out = args.worker
        worker(model, config, int(batch), int(warmup), int(steps), out)
        return
    rows = []
    for config in args.configs:
        tmp = Path(args.out).with_suffix(f".{len(rows)}.json")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--worker", args.model, config, str(args.batch), str(args.warmup)]
        proc = subprocess.run([*cmd, str(args.steps), str(tmp)], capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        rows.append({"config": config, **json.loads(tmp.read_text())})
        tmp.unlink()
        print(f"{config}: {rows[-1]}", flush=True)
    ref = rows[0]
    print(f"\n{args.model}, batch {args.batch}, {rows[0]['device']}\n")
    print("| config | trainable params | model state GB | checkpoint GB | step ms | peak GB of the step | step time "
          f"vs {ref['config']} |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['trainable'] / 1e6:.2f}M of {r['params'] / 1e6:.1f}M | {r['model_state_gb']:.2f} "
              f"| {r['checkpoint_gb']:.3f} | {r['step_ms']:.0f} | {r['peak_gb']:.2f} "
              f"| {r['step_ms'] / ref['step_ms']:.2f}x |")  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "cpu_count": os.cpu_count(), "rows": rows}
    write_results(args.out, {**meta, "model": args.model, "batch": args.batch})


if __name__ == "__main__":
    main()
