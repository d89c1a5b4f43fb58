"""How long a bad config takes to be refused: the 40 mistakes of the reliability suite (``BAD_CONFIGS``), each
as the process a user runs (``python -m clipkit train MISTAKE``) and in-process (``clipkit.cli.main``), several
rounds; median, spread and the slowest case, beside the machine's measured fp32 matmul peak.

The test suite checks what "fails fast" stands for (the error comes before a run directory, a process group, a
model or a loader exist; as a process, before torch is imported); the seconds are this script's, not a verdict.

    python benchmarks/config_check.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import write_results  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from tests.unit.test_config import BAD_CONFIGS  # noqa: E402  (the mistakes the reliability suite uses)


def as_process(overrides: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "clipkit", "train", *overrides], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, (overrides, proc.stderr[-500:])
    return seconds


def in_process(overrides: list[str]) -> float:
    from clipkit.cli import main

    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        main(["train", *overrides])
    return time.perf_counter() - t0


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/config_check.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from clipkit.bench import measured_matmul_flops

    peak = measured_matmul_flops(torch.device("cpu")) / 1e12
    rows = []
    for overrides, _ in BAD_CONFIGS:
        proc = [as_process(overrides) for _ in range(args.rounds)]
        inproc = [in_process(overrides) for _ in range(args.rounds)]
        rows.append({"overrides": overrides, "process": summary(proc), "in_process": summary(inproc)})
    medians = {k: [r[k]["median_s"] for r in rows] for k in ("process", "in_process")}
    slowest = max(rows, key=lambda r: r["process"]["median_s"])
    print(
        f"\nbad configs refused: {len(rows)} mistakes x {args.rounds} rounds; measured matmul peak {peak:.2f} TFLOP/s"
    )
    print(f"{'':>12} | {'median of medians':>17} | {'fastest':>8} | {'slowest case (median)':>22}")
    for kind, label in (("process", "as process"), ("in_process", "in-process")):
        slow = max(rows, key=lambda r: r[kind]["median_s"])
        print(
            f"{label:>12} | {statistics.median(medians[kind]):>15.2f} s | {min(medians[kind]):>6.2f} s | "
            f"{slow[kind]['median_s']:>6.2f} s {' '.join(slow['overrides'])[:40]}"
        )
    write_results(
        args.out,
        {
            "machine": platform.node(),
            "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "matmul_peak_tflops": peak,
            "rounds": args.rounds,
            "slowest_as_process": slowest["overrides"],
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
