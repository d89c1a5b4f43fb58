"""Every GPU figure clipkit's goals name, and the GPU tests, in one run of at most a few minutes
(``bash benchmarks/gpu_suite.sh``, which installs the carried wheels first).

Parts, in order (each a subprocess with its own time limit inside the suite's budget; one that fails or runs
out of time is recorded as such and the suite goes on):
  tests    ``pytest -m gpu tests/gpu`` (NCCL exactness, bf16 training on every engine, exports, bench, memory)
  step     clipkit's train step against open_clip_train's, same batch, bf16, synthetic data (``clipkit bench``):
           ViT-B/32 and ViT-B/16; samples/s, MFU against the chip's bf16 peak, peak memory
  loss     the gathered and the tiled InfoNCE alone at global batch 16k and 64k (time, memory)
  engines  one device under the single-process engine, ZeRO-1/2/3 and FSDP (step time)
  loader   clipkit's loader per core on real JPEGs (CPU work: runs beside the GPU parts)
  eval     zero-shot embedding throughput, clipkit's eval path and CLIP_benchmark's
Writes three files to ``--out``: ``gpu_suite.json`` (every figure), ``gpu_suite.md`` (tables and the goals),
``gpu_suite.log.gz`` (every part's output). Caches and run directories live in ``--work`` (a temporary folder).

``--dry-run`` runs the same parts at tiny sizes on any machine (the CPU here), with the same outputs: ``make
test`` runs it (``tests/integration/test_gpu_suite.py``), so a GPU's minutes go to figures, not to fixing this.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# (part, seconds it may take on the target machine, one H200; the whole suite has --budget-s)
BUDGETS = {"tests": 150, "step": 110, "loss": 40, "engines": 60, "eval": 40, "loader": 90}
GOALS = (
    "clipkit >= 1.3x open_clip samples/s; ViT-B/16 bf16 >= 40% MFU; tiled loss <= 1.1x gathered time and >= 20x "
    "less memory at 64k"
)


def sizes(dry: bool) -> dict:
    """What each part runs: the figures the goals name on a GPU, tiny and quick on a CPU (--dry-run)."""
    if dry:
        return {
            "step": [("tiny", 16, "fp32")],
            "bench_steps": ["bench.steps=2", "bench.warmup=1"],
            "loss": ["--device", "cpu", "--batches", "256", "512", "--repeats", "1"],
            "engines": ["--model", "tiny", "--batch", "16", "--precision", "fp32", "--steps", "2", "--warmup", "1"],
            "loader": ["--num-images", "64", "--sides", "128", "--repeats", "1"],
            "eval": ["--images", "64", "--models", "clipkit-tiny", "--device", "cpu", "--workers", "1"],
        }
    return {
        "step": [("vit_b32", 512, "bf16"), ("vit_b16", 256, "bf16")],
        "bench_steps": ["bench.steps=10", "bench.warmup=3"],
        "loss": ["--device", "cuda", "--batches", "16384", "65536", "--repeats", "2", "--max-mem-gib", "100"],
        "engines": ["--model", "vit_b32", "--batch", "256", "--precision", "bf16", "--steps", "10", "--warmup", "3"],
        "loader": ["--num-images", "1000", "--sides", "512", "256", "--repeats", "1"],
        "eval": ["--images", "4096", "--models", "ViT-B-32", "--device", "cuda", "--workers", "8", "--batch", "256"],
    }


class Suite:
    def __init__(self, out: Path, work: Path, budget_s: float):
        self.out, self.work, self.deadline = out, work, time.monotonic() + budget_s
        self.logs: list[tuple[str, str]] = []
        self.report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
        self.env = {
            **os.environ,
            "CLIPKIT_CACHE": str(work / "cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")])
            ),
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")  # (closed by finish)
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.log, proc.name, proc.t0 = log, name, time.monotonic()
        return proc

    def finish(self, proc: subprocess.Popen, limit: float) -> dict:
        try:
            rc = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        proc.log.close()
        text = (self.work / f"{proc.name}.log").read_text()
        self.logs.append((proc.name, text))
        status = {"rc": rc, "seconds": round(time.monotonic() - proc.t0, 1)}
        if rc != 0:
            status["error"] = (
                "ran out of its time" if rc == "timeout" else (text.strip().splitlines() or [""])[-1][:300]
            )
        return status

    def run(self, name: str, cmd: list[str], budget: float) -> dict:
        if self.left() < 5:
            return {"rc": "skipped", "error": "no time left in the suite's budget"}
        return self.finish(self.start(name, cmd), min(budget, self.left()))

    def save(self) -> None:
        self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (self.out / "gpu_suite.json").write_text(json.dumps(self.report, indent=1))
        (self.out / "gpu_suite.md").write_text(markdown(self.report))
        with gzip.open(self.out / "gpu_suite.log.gz", "wt") as f:
            for name, text in self.logs:
                f.write(f"===== {name} =====\n{text}\n")


def machine() -> dict:
    info = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    except ImportError:
        info["device"] = "unknown (no torch)"
    try:
        query = "--query-gpu=name,memory.total,driver_version"
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out/gpu"))
    ap.add_argument("--work", default=None, help="caches, run dirs and logs (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, default=330, help="the whole suite's wall time (the install excluded)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on any machine, same parts and outputs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clipkit-gpu-suite-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        suite = Suite(out, work, args.budget_s)
        suite.report.update(machine=machine(), dry_run=args.dry_run, goals=GOALS)
        run_parts(suite, sizes(args.dry_run))
        suite.save()
    print(markdown(suite.report))
    print(f"written to {out / 'gpu_suite.json'}, {out / 'gpu_suite.md'}, {out / 'gpu_suite.log.gz'}")


def run_parts(suite: Suite, size: dict) -> None:
    parts, work = suite.report["parts"], suite.work

    def save_after(name: str, status: dict, figures) -> None:
        parts[name] = {**status, "figures": figures}
        suite.save()  # (what is done is kept if the machine goes away)

    pytest = [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", "-rs"]
    if importlib.util.find_spec("xdist") is not None:
        pytest += ["-n", "4", "--dist", "loadgroup"]  # (the image has pytest-xdist: small runs side by side)
    status = suite.run("tests", pytest, BUDGETS["tests"])
    summary = next((line for line in reversed(suite.logs[-1][1].splitlines()) if " in " in line), "")
    save_after("tests", status, {"summary": summary.strip("= ")})

    # CPU work beside the GPU parts: the loader per core (one process = one core).
    loader = suite.start(
        "loader", [PY, "benchmarks/loader_throughput.py", *size["loader"], "--out", str(work / "loader.json")]
    )

    figures = []
    for model, batch, precision in size["step"]:
        name = f"step-{model}-b{batch}"
        result = work / f"{name}.json"
        cmd = [PY, "-m", "clipkit", "bench", f"model={model}", f"train.global_batch_size={batch}"]
        cmd += [f"train.precision={precision}", *size["bench_steps"], f"bench.output={result}"]
        cmd += [f"hydra.run.dir={work / 'runs' / name}"]
        status = suite.run(name, cmd, BUDGETS["step"] / len(size["step"]))
        figures.append({"name": name, **status, **(read_json(result) or {})})
    save_after("step", {"rc": 0 if all(f["rc"] == 0 for f in figures) else 1}, figures)

    cmd = [PY, "benchmarks/loss_memory.py", *size["loss"], "--impls", "clipkit-gathered", "clipkit-tiled"]
    status = suite.run("loss", [*cmd, "--out", str(work / "loss.json")], BUDGETS["loss"])
    save_after("loss", status, (read_json(work / "loss.json") or {}).get("rows", []))

    cmd = [PY, "benchmarks/engine_steps.py", *size["engines"], "--out", str(work / "engines.json")]
    status = suite.run("engines", cmd, BUDGETS["engines"])
    save_after("engines", status, read_json(work / "engines.json"))

    cmd = [PY, "benchmarks/eval_throughput.py", *size["eval"], "--skip-retrieval", "--out", str(work / "eval.json")]
    status = suite.run("eval", cmd, BUDGETS["eval"])
    save_after("eval", status, (read_json(work / "eval.json") or {}).get("throughput", []))

    status = suite.finish(loader, min(BUDGETS["loader"], max(5.0, suite.left())))
    save_after("loader", status, (read_json(work / "loader.json") or {}).get("rows", []))


def goals(r: dict) -> list[str]:
    """The goals, each with what this run measured (or why it could not say)."""
    lines = []
    steps = [f for f in r["parts"].get("step", {}).get("figures", []) if "results" in f]
    for f in steps:
        ck = f["results"]["clipkit"]
        lines.append(
            f"{f['model']} b{f['batch']} {f['precision']}: clipkit / open_clip {f.get('speedup', 0):.2f}x "
            f"(goal >= 1.3x); MFU {100 * ck['mfu']:.1f}% against {f['peak_tflops']:.3g} TFLOP/s ({f['peak_kind']})"
        )
    rows = {(x.get("impl"), x.get("global_batch")): x for x in r["parts"].get("loss", {}).get("figures", [])}
    for n in sorted({n for _, n in rows}):
        g, t = rows.get(("clipkit-gathered", n), {}), rows.get(("clipkit-tiled", n), {})
        if "time_s" in g and "time_s" in t:
            lines.append(
                f"loss at {n}: tiled {t['time_s'] / g['time_s']:.2f}x the gathered time (goal <= 1.1x), "
                f"{g['peak_loss_mem_MiB'] / max(t['peak_loss_mem_MiB'], 1e-9):.1f}x less memory (goal >= 20x at 64k)"
            )
    return lines or ["no goal could be measured in this run"]


def markdown(r: dict) -> str:
    m = r.get("machine", {})
    head = "GPU suite (dry run on the CPU: tiny sizes, no GPU figure)" if r.get("dry_run") else "GPU suite"
    lines = [f"# {head}", "", f"{m.get('device')}; {m.get('nvidia_smi') or 'no nvidia-smi'}; torch {m.get('torch')}, "
             f"Python {m.get('python')}; {r.get('started')} - {r.get('finished')}", ""]  # fmt: skip
    lines += ["| part | result | seconds |", "|---|---|---:|"]
    for name, p in r["parts"].items():
        result = "ok" if p.get("rc") == 0 else f"{p.get('rc')}: {p.get('error', '')}"
        lines.append(f"| {name} | {result} | {p.get('seconds', '')} |")
    lines += ["", "## Goals", "", f"({r.get('goals')})", ""] + [f"- {g}" for g in goals(r)]
    lines += ["", "## Train step, clipkit vs open_clip_train (same batch, precision, synthetic data)", ""]
    lines += [
        "| model | batch | precision | trainer | samples/s | MFU | peak GB | fed |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for f in r["parts"].get("step", {}).get("figures", []):
        for side, row in f.get("results", {}).items():
            lines.append(
                f"| {f['model']} | {f['batch']} | {f['precision']} | {side} | {row['samples_per_s']:.0f} "
                f"| {100 * row['mfu']:.1f}% | {row['peak_mem_gb']:.2f} | {f.get('fed', {}).get(side, '')} |"
            )
    lines += ["", "## Loss alone (forward + backward, one process)", "", "| impl | global batch | peak MiB | s |"]
    lines += ["|---|---:|---:|---:|"]
    for x in r["parts"].get("loss", {}).get("figures", []):
        if "time_s" in x:
            lines.append(f"| {x['impl']} | {x['global_batch']} | {x['peak_loss_mem_MiB']:.1f} | {x['time_s']:.4f} |")
        else:
            lines.append(f"| {x.get('impl')} | {x.get('global_batch')} | {x.get('skipped', x.get('error', ''))} | |")
    engines = r["parts"].get("engines", {}).get("figures") or {}
    lines += ["", f"## Engines on one device ({engines.get('args', {}).get('model', '')})", ""]
    lines += ["| engine | step s | samples/s | peak GB |", "|---|---:|---:|---:|"]
    for x in engines.get("rows", []):
        if "error" in x:
            lines.append(f"| {x['engine']} | failed: {x['error'][:100]} | | |")
        else:
            lines.append(f"| {x['engine']} | {x['step_s']:.4f} | {x['samples_per_s']:.0f} | {x['peak_mem_gb']:.2f} |")
    lines += ["", "## Loader per core (images/s, 224 px out)", "", "| source px | clipkit | open_clip | decode only |"]
    lines += ["|---:|---:|---:|---:|"]
    for x in r["parts"].get("loader", {}).get("figures", []):
        lines.append(f"| {x['source_px']} | {x['clipkit']:.0f} | {x['open_clip']:.0f} | {x['decode_only']:.0f} |")
    lines += [
        "",
        "## Eval embedding throughput (images/s)",
        "",
        "| model | clipkit | CLIP_benchmark |",
        "|---|---:|---:|",
    ]
    for x in r["parts"].get("eval", {}).get("figures", []):
        lines.append(f"| {x['model']} | {x['clipkit']:.0f} | {x['clip_benchmark']:.0f} |")
    lines += ["", f"Tests: {r['parts'].get('tests', {}).get('figures', {}).get('summary', 'not run')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
