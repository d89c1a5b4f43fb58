"""Run logging: console progress bar, ``metrics.jsonl``, and wandb (optional; never fatal); throughput, MFU and
peak-memory meters."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

log = logging.getLogger("clipkit")

# Dense peak TFLOP/s per device (bf16/fp16 tensor cores; fp32 = TF32 tensor cores where torch allows TF32,
# else plain fp32), from the vendors' data sheets. Matched as substrings of torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM; the PCIe card is ~756 bf16
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # fp16 tensor cores (V100 has no bf16)
}


def forward_flops_per_sample(model: torch.nn.Module, image_size: int, context_length: int, device) -> float:
    """FLOPs of one (image, caption) forward, counted by torch's FlopCounterMode on the real model (train mode,
    so patch dropout counts as configured; autograd on, so attention takes the path training takes)."""
    was_training = model.training
    model.train()
    image = torch.zeros(1, 3, image_size, image_size, device=device)
    text = torch.zeros(1, context_length, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model(image, text)
    model.train(was_training)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, amp_dtype: torch.dtype | None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the override, else the table for known GPUs, else None (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None

    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks["bf16" if amp_dtype is not None else "fp32"] * 1e12
    return None


def _proc_status_gb(field: str) -> float:
    """A memory line of /proc/self/status (Linux) in GiB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on a GPU, resident (VmHWM) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return _proc_status_gb("VmHWM")


def resident_memory_gb() -> float:
    """Current resident memory of this process (VmRSS)."""
    return _proc_status_gb("VmRSS")


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak for ``peak_memory_gb`` (CPU: resets VmHWM through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Throughput:
    """Samples/s over the steps since the last ``rate()`` call, and the fraction of that time spent waiting for data."""

    def __init__(self):
        self._t0, self._samples, self._wait = time.perf_counter(), 0, 0.0

    def add(self, samples: int, data_wait_s: float) -> None:
        self._samples += samples
        self._wait += data_wait_s

    def rate(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        out = self._samples / elapsed, 100.0 * self._wait / elapsed
        self.__init__()
        return out


def lines_up_to(path: Path, step: int) -> list[str]:
    """The JSON lines of ``path`` whose step is <= ``step``; a line torn by a kill mid-write is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept


class RunLogger:
    """Rank 0 writes; other ranks' calls are no-ops. Truncates ``metrics.jsonl`` to the resumed step."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        wandb_cfg: dict | None,
        config: dict,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self.tensorboard = None
        if not enabled:
            return
        self._truncate(start_step)
        if progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
            )
        if wandb_cfg:
            self.wandb = _start_wandb(run_dir, wandb_cfg, config)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the checkpoint we resume from are dropped (one curve, as above)
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def _truncate(self, start_step: int) -> None:
        """Drops lines past the checkpoint we resume from, so the file is one consistent curve."""
        if self.path.exists():
            self.path.write_text("".join(ln + "\n" for ln in lines_up_to(self.path, start_step)))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = loggable(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in scalars(record).items():
                self.tensorboard.add_scalar(key, value, global_step=record["step"])
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record["step"])
            except Exception as err:  # logging must never kill a run
                log.warning("wandb.log failed (%s); disabling wandb", err)
                self.wandb = None

    def progress(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
            self.wandb = None


REPORT_ONLY = ("examples", "confusion", "classnames")  # eval parts for summary.json and the report only


def loggable(record: dict) -> dict:
    """``record`` without the report-only parts of eval results (retrieval examples, confusion matrices)."""
    if "eval" not in record:
        return record
    evals = {name: {k: v for k, v in r.items() if k not in REPORT_ONLY} for name, r in record["eval"].items()}
    return {**record, "eval": evals}


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics record, nested keys joined by ``/`` (``eval/zeroshot/acc1``); the step
    and per-sample counters are axes, not curves."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("step", "epoch"):
            out[name] = float(value)
    return out


def _start_wandb(run_dir: Path, cfg: dict, config: dict):
    mode = cfg.get("mode", "offline")
    if mode == "disabled":
        return None
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        log.warning("wandb online mode without credentials (WANDB_API_KEY or ~/.netrc): using offline mode")
        mode = "offline"
    try:
        import wandb

        return wandb.init(
            project=cfg.get("project"),
            entity=cfg.get("entity"),
            dir=str(run_dir),
            mode=mode,
            config=config,
            name=Path(run_dir).name,
            resume="allow",
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as err:
        log.warning("wandb disabled: %s", err)
        return None


class SpikeDetector:
    """Flags a loss far above its recent level: > mean + ``k`` std and > ``ratio`` x mean of an exponential
    moving average, after ``warmup`` steps. Only upward jumps count (a falling loss never alarms)."""

    def __init__(self, k: float = 6.0, ratio: float = 1.5, alpha: float = 0.05, warmup: int = 10):
        self.k, self.ratio, self.alpha, self.warmup = k, ratio, alpha, warmup
        self.mean, self.var, self.n = 0.0, 0.0, 0

    def update(self, loss: float) -> bool:
        spike = self.n >= self.warmup and loss > self.mean + self.k * self.var**0.5 and loss > self.ratio * self.mean
        if spike:
            return True  # a spike does not enter the statistics
        if self.n == 0:
            self.mean = loss
        else:
            delta = loss - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.n += 1
        return False


class KeyLog:
    """``train.record_keys``: each rank appends ``{"step", "keys": [[epoch, key], ...]}`` per update to
    ``keys/rank_NNN.jsonl``; on resume, lines past the resumed step are dropped (as in metrics.jsonl)."""

    def __init__(self, run_dir: Path, rank: int, start_step: int):
        self.path = Path(run_dir) / "keys" / f"rank_{rank:03d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = lines_up_to(self.path, start_step) if self.path.exists() else []
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, step: int, batches: list[dict]) -> None:
        keys = [[e, k] for b in batches for e, k in zip(b["epochs"], b["keys"], strict=True)]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")
