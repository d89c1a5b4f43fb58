"""Downloads what the GPU machine lacks into ``.gpu-wheels/`` (``make gpu-wheels``), to be carried there.

The GPU image has torch (a CUDA build) but not open_clip, webdataset, Hydra, DeepSpeed or wandb, and no network.
This resolves clipkit's dependencies here (``pip install --dry-run --report``), drops torch, torchvision, triton
and the nvidia-* CUDA libraries (the image's own stay in use), downloads the rest for the GPU machine's Python
and platform without their dependencies, and builds clipkit's own wheel. DeepSpeed ships as an sdist only; it is
carried as such and built there without build isolation (its ops compile at run time).

The device tool carries at most 64 MiB: the default set leaves out what only some GPU tests need (``--extras
hf,onnx`` adds transformers / onnx / onnxruntime for the export tests, which skip without them; wandb is imported
only with ``logging.wandb=true``, ``--with-wandb`` adds it). The total size is printed.

    python benchmarks/gpu_wheels.py [--python 3.11] [--platform manylinux2014_x86_64] [--extras hf,onnx]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

SKIP = ("setuptools", "pip", "wheel")


def resolve(target: list[str], report: Path) -> dict[str, str]:
    """name -> version of everything ``pip install target`` would install (a dry run, nothing installed)."""
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report)]
    subprocess.run([*pip, *target], check=True, capture_output=True)
    items = json.loads(report.read_text())["install"]
    report.unlink()
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in items}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu-wheels")
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    ap.add_argument("--platform", default="manylinux2014_x86_64")
    ap.add_argument("--extras", default="", help="comma-separated clipkit extras to add (hf, onnx)")
    ap.add_argument("--with-wandb", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target = f".[{args.extras}]" if args.extras else "."
    pip = [sys.executable, "-m", "pip"]
    # torch, torchvision and their dependencies (CUDA libraries, triton, sympy, ...) are the image's own.
    image = resolve(["torch", "torchvision"], out / "report.json")
    wanted = {
        name: version
        for name, version in resolve([target, "pytest"], out / "report.json").items()
        if name not in image and name != "clipkit" and not name.startswith(SKIP)
        and (name != "wandb" or args.with_wandb)
    }  # fmt: skip
    platform = ["--python-version", args.python, "--platform", args.platform, "--implementation", "cp"]
    binary = sorted(f"{n}=={v}" for n, v in wanted.items())
    sdist = []
    while binary:  # wheels where they exist; packages published as sdists only are carried as sdists
        cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *platform, "-d", str(out), *binary]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            break
        missing = re.findall(r"No matching distribution found for (\S+)", proc.stderr)
        if not missing:
            raise SystemExit(proc.stderr)
        sdist += missing
        binary = [b for b in binary if b not in missing]
    if sdist:
        subprocess.run([*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(out), *sdist], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(out)], check=True)
    files = sorted(out.iterdir())
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}")
    print(f"{total / 2**20:8.2f} MiB in {len(files)} files in {out}/ (the device tool carries at most 64 MiB)")


if __name__ == "__main__":
    main()
