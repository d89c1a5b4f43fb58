"""Builds ``.gpu-wheels/``: what the GPU machine lacks to run clipkit, as wheels it can install with no network.

The GPU machine (``benchmarks/gpu_image.txt``) has Python 3.12 on Linux x86_64 with torch (a CUDA build) and many
libraries, but not open_clip, webdataset, Hydra, DeepSpeed or wandb. This script

1. resolves clipkit's dependencies here (``pip install --dry-run --report``) and walks them from clipkit down,
   with their environment markers evaluated for the GPU machine, stopping at every package the image has (its
   own builds stay in use: nothing it has is carried, torch above all);
2. downloads one wheel per package for CPython 3.12 on manylinux x86_64 (several manylinux tags; pure and abi3
   wheels too); a package published as an sdist only (DeepSpeed, antlr4) is built into a wheel here, which must
   come out pure Python (``py3-none-any``), and clipkit's own wheel is built;
3. checks the set (``check``; also what ``tests/integration/test_gpu_wheels.py`` runs): every file a wheel
   installable there, one version per package, nothing the image has, and pip resolves the set for Python 3.12
   with ``--no-index`` (a dry run against the wheels plus metadata-only stand-ins for the image's packages),
   using every wheel carried. The device tool carries at most 64 MiB with the source tree; the size is checked.

    python benchmarks/gpu_wheels.py [--out .gpu-wheels] [--extras s3]

Then, on the GPU machine, ``bash benchmarks/gpu_suite.sh`` installs them (``--no-index --no-deps`` into a folder
of its own) and stops at once, naming the package, if that fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = ROOT / "benchmarks" / "gpu_image.txt"
PYTHON = "3.12"
# Where the image's Python (3.12.3, glibc 2.39) installs from: manylinux tags down to the oldest in use.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17, 12, 5)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
MARKER_ENV = {
    "python_version": PYTHON,
    "python_full_version": f"{PYTHON}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
TARGET = ["--python-version", PYTHON, "--implementation", "cp", "--abi", f"cp{PYTHON.replace('.', '')}"]
TARGET += ["--abi", "abi3", "--abi", "none"] + [a for p in PLATFORMS for a in ("--platform", p)]
MAX_MIB = 56  # of the device tool's 64 MiB, what the wheels may take beside the source tree
# Left out unless asked for (--with NAME): imported only where used, and too big to carry for nothing.
LEFT_OUT = {
    "wandb": "imported only with logging.wandb=true; 19 MiB with its own dependencies",
    "pycocoevalcap": "CoCa's BLEU-4 / CIDEr only (clipkit.eval.captioning); 99 MiB, mostly Java jars never run",
}


def image_packages(path: Path = IMAGE_FILE) -> dict[str, str | None]:
    """name -> version (None where unknown) of what the GPU image has."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"pip {' '.join(args[:3])} ... failed:\n{proc.stderr[-3000:]}")
    return proc


def resolve_here(extras: list[str]) -> dict[str, dict]:
    """Canonical name -> metadata (version, requires_dist) of everything ``pip install .[extras]`` would install."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
        pip("install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), target)
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in items}


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in (extras or {""}))


def to_carry(meta: dict[str, dict], image: dict, extras: list[str], left_out: set[str]) -> dict[str, str]:
    """name -> version of clipkit's dependencies the image lacks, walked from clipkit down for the GPU machine."""
    carry: dict[str, str] = {}
    todo, seen = [("clipkit", frozenset(extras))], set()
    while todo:
        name, with_extras = todo.pop()
        for text in meta[name].get("requires_dist") or []:
            req = Requirement(text)
            dep = canonicalize_name(req.name)
            if not applies(req, set(with_extras)) or dep in image or dep in left_out:
                continue
            if dep not in meta:
                raise SystemExit(f"{dep} (needed by {name} on Python {PYTHON}) is not in the resolution made here")
            carry[dep] = meta[dep]["version"]
            if (dep, frozenset(req.extras)) not in seen:
                seen.add((dep, frozenset(req.extras)))
                todo.append((dep, frozenset(req.extras)))
    return carry


def download(carry: dict[str, str], out: Path) -> None:
    """One wheel per package for the GPU machine; sdist-only packages built here into pure wheels."""
    binary = sorted(f"{n}=={v}" for n, v in carry.items())
    sdist_only = []
    while binary:
        proc = pip("download", "-q", "--no-deps", "--only-binary=:all:", *TARGET, "-d", str(out), *binary, check=False)
        if proc.returncode == 0:
            break
        missing = re.findall(r"No matching distribution found for (\S+)", proc.stderr)
        if not missing:
            raise SystemExit(proc.stderr[-3000:])
        sdist_only += missing
        binary = [b for b in binary if b not in missing]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in sdist_only:  # (DeepSpeed: ops compile at run time, so its wheel is pure Python)
            pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, spec)
        for sdist in sorted(Path(tmp).iterdir()):
            pip("wheel", "-q", "--no-deps", "--no-build-isolation", str(sdist), "-w", str(out))
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out))


def installable(filename: str) -> bool:
    """Whether a wheel installs on CPython 3.12, Linux x86_64 (pure, abi3, or cp312 with a manylinux tag)."""
    _, _, _, tags = parse_wheel_filename(filename)
    for tag in tags:
        py_ok = tag.interpreter in ("py3", "py2.py3", "cp312") or (
            tag.abi == "abi3" and re.fullmatch(r"cp3(\d+)", tag.interpreter) and int(tag.interpreter[3:]) <= 12
        )
        abi_ok = tag.abi in ("none", "abi3", "cp312")
        plat_ok = tag.platform == "any" or tag.platform in PLATFORMS
        if py_ok and abi_ok and plat_ok:
            return True
    return False


def stub_wheel(directory: Path, name: str, version: str) -> None:
    """A metadata-only wheel standing in for a package of the image in the dry-run resolution."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def check(out: Path, image: dict[str, str | None], extras: list[str], versions: dict[str, str]) -> list[str]:
    """What is wrong with the wheel set in ``out`` for the GPU machine (empty: nothing). ``versions`` stands in
    for the image's packages whose version ``image`` does not know (the resolution made here)."""
    problems = []
    files = sorted(out.iterdir())
    wheels = [f for f in files if f.suffix == ".whl"]
    problems += [f"{f.name}: not a wheel" for f in files if f.suffix != ".whl"]
    problems += [f"{w.name}: does not install on CPython {PYTHON} x86_64" for w in wheels if not installable(w.name)]
    names: dict[str, list[str]] = {}
    for w in wheels:
        names.setdefault(canonicalize_name(parse_wheel_filename(w.name)[0]), []).append(w.name)
    problems += [f"{n}: {len(v)} versions ({', '.join(v)})" for n, v in names.items() if len(v) > 1]
    problems += [f"{n}: the image has it already" for n in names if n in image]
    size = sum(f.stat().st_size for f in files) / 2**20
    if size > MAX_MIB:
        problems.append(f"{size:.1f} MiB in all, over the {MAX_MIB} MiB the device tool leaves for wheels")
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "image"
        stubs.mkdir()
        for name, version in image.items():
            if version or name in versions:
                stub_wheel(stubs, name, version or versions[name])
        report = Path(tmp) / "report.json"
        target = f"clipkit[{','.join(extras)}]" if extras else "clipkit"
        args = ["install", "--dry-run", "--no-index", "--find-links", str(out), "--find-links", str(stubs)]
        args += ["--only-binary=:all:", *TARGET, "--target", str(Path(tmp) / "t"), "--ignore-installed"]
        proc = pip(*args, "-q", "--report", str(report), target, check=False)
        if proc.returncode != 0:
            return problems + [f"pip cannot resolve the set for Python {PYTHON}: {proc.stderr.strip()[-1500:]}"]
        chosen = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    problems += [f"{n}: carried but not needed" for n in names if n not in chosen]
    problems += [f"{n}: needed, neither carried nor in the image" for n in chosen if n not in names and n not in image]
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu-wheels")
    ap.add_argument("--extras", default="", help="comma-separated clipkit extras to add (s3, gcs)")
    ap.add_argument("--with", dest="with_", default="", help=f"comma-separated, from {', '.join(LEFT_OUT)}")
    args = ap.parse_args()
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    extras = [e for e in args.extras.split(",") if e]
    left_out = set(LEFT_OUT) - {canonicalize_name(n) for n in args.with_.split(",") if n}
    image = image_packages()
    meta = resolve_here(extras)
    carry = to_carry(meta, image, extras, left_out)
    download(carry, out)
    files = sorted(out.iterdir())
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}")
    total = sum(f.stat().st_size for f in files) / 2**20
    print(f"{total:8.2f} MiB in {len(files)} wheels in {out}/ (CPython {PYTHON}, manylinux x86_64)")
    for name in sorted(left_out):
        print(f"left out: {name} ({LEFT_OUT[name]}; --with {name} adds it)")
    versions = {name: m["version"] for name, m in meta.items()}
    # (the left-out packages stand in the resolution as the image's do: present there or deliberately absent)
    problems = check(out, {**image, **{n: versions[n] for n in left_out}}, extras, versions)
    if problems:
        raise SystemExit("the wheel set would not install on the GPU machine:\n  " + "\n  ".join(problems))
    print("checked: every wheel installs on CPython 3.12 x86_64, one version each, none the image has; pip resolves")
    print("the set with --no-index for Python 3.12 and uses every wheel")


if __name__ == "__main__":
    main()
