"""``clipkit bench``: clipkit's training step and open_clip's own, back to back, on the same model, batch,
precision and data; samples/s, MFU, data-wait and peak memory of each, and the ratio.

- clipkit: the engine, loss and (cached) step function ``clipkit train`` uses; uint8 images shipped to the device
  and normalised there.
- open_clip: ``open_clip_train.train.train_one_epoch`` itself (the reference trainer's step: autocast, ClipLoss,
  backward, clipping, AdamW, logit-scale clamp), fed float images normalised on the host, as its loader does.
  With ``train.compile=model`` or ``step``, its model is torch.compile'd as its ``--torchcompile`` does (the
  installed open_clip_train has no compiled-step strategy); both sides compile in the warmup steps.
Each side is fed as its own loader feeds it on a GPU: batches in pinned host memory (both loaders pin), copied
with ``non_blocking`` (``feeds``; the result's ``fed`` says what each side got). At most ``MAX_DISTINCT``
distinct batches are prepared and cycled, which bounds the pinned memory.
Data: ``bench.data=synthetic`` (random images and tokens) or ``bench.data=train`` (batches of the configured
training data, decoded by clipkit's loader). Either way the batches are prepared up front and both trainers get
the same ones, so the figures compare the training steps; data-wait is then the host-to-device hand-over
(``benchmarks/loader_throughput.py`` compares the loaders themselves). Single process (one device).
MFU = samples/s x 3 x forward FLOPs per sample / peak FLOP/s. The peak is ``logging.peak_tflops``, the data-sheet
value of a known GPU, or, on a CPU, the fp32 matmul rate measured here (labelled "measured matmul peak").
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch

from clipkit import model as model_lib
from clipkit.data import ensure_demo
from clipkit.data.transforms import DeviceNormalize
from clipkit.distributed import DistEnv, set_fp32_math
from clipkit.engine import build_engine
from clipkit.engine.parts import MAX_LOGIT_SCALE, autocast_dtype
from clipkit.loss import build_caption_loss, build_loss
from clipkit.metrics import forward_flops_per_sample, peak_flops, peak_memory_gb, reset_peak_memory
from clipkit.model_config import is_coca
from clipkit.optim import build_optimizer
from clipkit.step import Terms, step_function
from clipkit.train import build_loader

if TYPE_CHECKING:
    from clipkit.config import RootConfig

log = logging.getLogger("clipkit")


def measured_matmul_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Achieved fp32 FLOP/s of an n x n matmul on ``device`` (a stand-in peak where no data sheet applies)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MAX_DISTINCT = 8  # distinct batches prepared per side (cycled over warmup + steps)


def feeds(batches: list[tuple], device: torch.device, mean, std) -> tuple[dict[str, list], dict[str, str]]:
    """Each trainer's batches as its own loader hands them over: clipkit's uint8 images, open_clip's float images
    normalised on the host; pinned on a CUDA run (both loaders use ``pin_memory``), so that the copy each step
    makes with ``non_blocking=True`` is asynchronous. Returns (batches per side, what each side was given)."""
    pin = device.type == "cuda"

    def ready(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if pin else t

    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    fed = {
        "clipkit": [(ready(im), ready(tx)) for im, tx in batches],
        "open_clip": [(ready((im.float() / 255 - mean_t) / std_t), ready(tx)) for im, tx in batches],
    }
    how = "pinned host memory, copied non_blocking" if pin else "host memory (no device copy on a CPU run)"
    described = {
        "clipkit": f"uint8 images (normalised on the device) and token ids; {how}",
        "open_clip": f"float32 images normalised on the host (its loader's output) and token ids; {how}",
    }
    return fed, described


def synthetic_batches(num: int, batch: int, image_size: int, context_length: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g),
            torch.randint(1, 49407, (batch, context_length), generator=g),
        )
        for _ in range(num)
    ]


def train_batches(cfg: RootConfig, built, num: int) -> list[tuple]:
    """``num`` global batches of the configured training data, decoded by clipkit's loader."""
    demo = ensure_demo(cfg.data, say=lambda m: log.info(m)) if cfg.data.train == "demo" else None
    loader, _ = build_loader(cfg, built, DistEnv(), demo)
    micro = cfg.train.micro_batch(1)
    out = []
    for _ in range(num):
        parts = [next(loader) for _ in range(cfg.train.global_batch_size // micro)]
        out.append((torch.cat([p["image"] for p in parts]), torch.cat([p["text"] for p in parts])))
    loader.close()
    return out


def bench_clipkit(cfg: RootConfig, batches: list[tuple], device: torch.device, warmup: int) -> dict:
    torch.manual_seed(cfg.train.seed)
    built = model_lib.build(cfg.model, device)
    engine = build_engine(built.model, cfg, DistEnv(device=device))
    loss_fn = build_loss(cfg.loss.name, cfg.loss.impl, cfg.loss.chunk_size, cfg.loss.contrastive_weight)
    caption = build_caption_loss(cfg, built.model)  # (CoCa: the captioning term too, as training runs it)
    micro = cfg.train.micro_batch(1)
    normalize = DeviceNormalize(built.mean, built.std).to(device)
    built.model.train()
    step = step_function(engine, cfg.train.compile)  # (as ``clipkit train`` picks)
    wait = 0.0
    for i, (images_u8, text) in enumerate(batches):
        if i == warmup:
            _sync(device)
            reset_peak_memory(device)
            t0, wait = time.perf_counter(), 0.0
        t_fetch = time.perf_counter()
        pairs = [
            (normalize(im.to(device, non_blocking=True)), tx.to(device, non_blocking=True))
            for im, tx in zip(images_u8.split(micro), text.split(micro), strict=True)
        ]
        wait += time.perf_counter() - t_fetch
        step(engine, loss_fn, pairs, Terms(caption=caption))
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "data_wait_s": wait, "peak_mem_gb": peak_memory_gb(device)}


class _DataInfo:
    """open_clip_train.data.DataInfo's interface (its module needs pandas, which clipkit does not)."""

    def __init__(self, dataloader):
        self.dataloader = dataloader

    def set_epoch(self, epoch: int) -> None:
        pass


class _Loader:
    """What open_clip_train's loop needs of a dataloader; times the waits for the next batch."""

    def __init__(self, batches: list[tuple], batch_size: int):
        self.batches, self.num_batches = batches, len(batches)
        self.num_samples = len(batches) * batch_size
        self.wait = 0.0

    def __iter__(self):
        it = iter(self.batches)
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            self.wait += time.perf_counter() - t0
            if item is None:
                return
            yield item


def bench_open_clip(cfg: RootConfig, batches: list[tuple], device: torch.device, warmup: int) -> dict:
    from open_clip_train.params import parse_args
    from open_clip_train.train import train_one_epoch

    torch.manual_seed(cfg.train.seed)
    built = model_lib.build(cfg.model, device)  # the same open_clip model and initial weights
    model = built.model.train()
    amp = autocast_dtype(cfg.train.precision, device)
    args = parse_args([])
    args.device, args.batch_size, args.world_size, args.rank, args.local_rank = str(device), len(batches[0][0]), 1, 0, 0
    args.precision = {None: "fp32", torch.bfloat16: "amp_bf16", torch.float16: "amp"}[amp]
    args.accum_freq = cfg.train.global_batch_size // cfg.train.micro_batch(1)
    args.grad_clip_norm = cfg.optim.grad_clip_norm or None
    args.log_every_n_steps, args.distill, args.skip_scheduler, args.wandb, args.save_logs = (
        10**9,
        False,
        True,
        False,
        False,
    )
    if is_coca(cfg.model):  # open_clip_train's --coca-*-loss-weight
        weight = 2.0 if cfg.loss.caption_weight is None else cfg.loss.caption_weight
        loss = open_clip.CoCaLoss(caption_loss_weight=weight, clip_loss_weight=cfg.loss.contrastive_weight)
    elif cfg.loss.name == "siglip":
        loss = open_clip.SigLipLoss()
    else:
        loss = open_clip.ClipLoss()
    optimizer = build_optimizer(model, cfg.optim, device)
    if cfg.train.compile != "false":  # what its main does with --torchcompile (this version compiles the model)
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    # (batches: float images normalised on the host, as open_clip's loader yields them; see ``feeds``)
    warm, timed = _Loader(batches[:warmup], args.batch_size), _Loader(batches[warmup:], args.batch_size)
    quiet = logging.getLogger()
    level, quiet.level = quiet.level, logging.WARNING  # its per-step INFO lines
    try:
        train_one_epoch(model, {"train": _DataInfo(warm)}, loss, 0, optimizer, scaler, None, None, args)
        _sync(device)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        train_one_epoch(model, {"train": _DataInfo(timed)}, loss, 1, optimizer, scaler, None, None, args)
        _sync(device)
    finally:
        quiet.level = level
    assert float(model.logit_scale) <= MAX_LOGIT_SCALE + 1e-6
    return {"seconds": time.perf_counter() - t0, "data_wait_s": timed.wait, "peak_mem_gb": peak_memory_gb(device)}


def bench_command(cfg: RootConfig, run_dir: Path) -> dict:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.train.device == "auto" else cfg.train.device)
    set_fp32_math(device, cfg.train.tf32)  # (one process: both trainers run under the same setting)
    b = cfg.bench
    built = model_lib.build(cfg.model, device)
    fwd = forward_flops_per_sample(built.model, built.image_size, built.context_length, device)
    amp = autocast_dtype(cfg.train.precision, device)
    peak, peak_kind = peak_flops(device, amp, cfg.logging.peak_tflops), "data sheet / logging.peak_tflops"
    if peak is None:
        peak, peak_kind = measured_matmul_flops(device), "measured fp32 matmul peak"
    batch, num = cfg.train.global_batch_size, min(b.warmup + b.steps, MAX_DISTINCT)
    if b.data == "train":
        batches = train_batches(cfg, built, num)
    else:
        batches = synthetic_batches(num, batch, built.image_size, built.context_length, cfg.train.seed)
    fed, described = feeds(batches, device, built.mean, built.std)
    del built, batches
    for side in fed:  # (cycled: the same few batches again; a step's cost does not depend on its pixels)
        fed[side] = [fed[side][i % num] for i in range(b.warmup + b.steps)]
    sides = {"clipkit": bench_clipkit(cfg, fed["clipkit"], device, b.warmup)}
    if b.baseline:
        sides["open_clip"] = bench_open_clip(cfg, fed["open_clip"], device, b.warmup)
    rows = {}
    for name, r in sides.items():
        rate = b.steps * batch / r["seconds"]
        rows[name] = {
            "samples_per_s": rate,
            "mfu": rate * 3 * fwd / peak,
            "data_wait_pct": 100 * r["data_wait_s"] / r["seconds"],
            "peak_mem_gb": r["peak_mem_gb"],
        }
    result = {
        "model": cfg.model.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp],
        "compile": {
            "clipkit": str(cfg.train.compile),
            "open_clip": "model" if cfg.train.compile != "false" else "false",
        },
        "batch": batch,
        "steps": b.steps,
        "forward_gflops_per_sample": fwd / 1e9,
        "peak_tflops": peak / 1e12,
        "peak_kind": peak_kind,
        "fed": {side: described[side] for side in rows},
        "results": rows,
    }
    if "open_clip" in rows:
        result["speedup"] = rows["clipkit"]["samples_per_s"] / rows["open_clip"]["samples_per_s"]
    out = Path(b.output) if b.output else Path(run_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_bench(result) + f"\nwritten to {out}", flush=True)
    return result


def format_bench(r: dict) -> str:
    compiled = r.get("compile", {})
    compiled = (
        ", ".join(f"{side} {how}" for side, how in compiled.items())
        if any(how != "false" for how in compiled.values())
        else ""
    )
    lines = [
        f"{r['model']} on {r['device']}, {r['precision']}, batch {r['batch']}, {r['steps']} timed steps; "
        f"{r['forward_gflops_per_sample']:.2f} GFLOPs forward/sample; peak {r['peak_tflops']:.2f} TFLOP/s "
        f"({r['peak_kind']})" + (f"; torch.compile: {compiled}" if compiled else ""),
        "| trainer | samples/s | MFU | data-wait | peak memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in r["results"].items():
        lines.append(
            f"| {name} | {row['samples_per_s']:.1f} | {100 * row['mfu']:.1f}% | {row['data_wait_pct']:.1f}% "
            f"| {row['peak_mem_gb']:.2f} GB |"
        )
    lines += [f"{side} was fed: {how}" for side, how in r.get("fed", {}).items()]
    if "speedup" in r:
        lines.append(f"clipkit / open_clip samples/s: {r['speedup']:.2f}x")
    return "\n".join(lines)
