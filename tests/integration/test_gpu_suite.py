"""The GPU suite's dry run (issue 27): ``bash benchmarks/gpu_suite.sh --dry-run`` runs every part at tiny sizes
on the CPU and writes what the GPU run writes (three files, none below ``$OUT``, every part's figures), so that
a lent GPU spends its minutes on figures. Its install step stops at once, naming the wheel, when the carried set
does not install."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["tests", "step", "loss", "engines", "eval", "loader"]


def suite(out: Path, *args: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-out")
    return out, suite(out, "--dry-run")


def test_dry_run_writes_what_the_gpu_run_writes(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["gpu_suite.json", "gpu_suite.log.gz", "gpu_suite.md"]  # (at most 8 come back, 2 deep)
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["dry_run"] is True and {"device", "torch", "python"} <= set(report["machine"])
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["rc"] == 0, (name, part)
        assert part["figures"], name
    step = report["parts"]["step"]["figures"][0]
    assert set(step["results"]) == {"clipkit", "open_clip"} and set(step["fed"]) == {"clipkit", "open_clip"}
    engines = {r["engine"]: r for r in report["parts"]["engines"]["figures"]["rows"]}
    assert set(engines) == {"ddp", "zero1", "zero2", "zero3", "fsdp"}
    assert all(r["samples_per_s"] > 0 for r in engines.values()), engines
    assert {(r["impl"], r["global_batch"]) for r in report["parts"]["loss"]["figures"]} >= {
        ("clipkit-gathered", 512),
        ("clipkit-tiled", 512),
    }
    assert "skipped" in report["parts"]["tests"]["figures"]["summary"]  # (no CUDA here: every GPU test skips)
    log = gzip.decompress((out / "gpu_suite.log.gz").read_bytes()).decode()
    assert all(f"===== {name}" in log for name in PARTS)
    md = (out / "gpu_suite.md").read_text()
    assert "dry run" in md and "## Goals" in md and "| zero3 |" in md


def test_a_wheel_that_does_not_install_stops_the_suite_naming_it(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    bad = "fakepkg-1.0-cp399-cp399-manylinux2014_x86_64.whl"  # (a wheel for a Python this is not)
    (wheels / bad).write_bytes(b"PK\x05\x06" + b"\0" * 18)
    proc = suite(tmp_path / "out", "--dry-run", GPU_SUITE_INSTALL="1", GPU_WHEELS=str(wheels))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "installing the carried wheels failed, stopping" in proc.stderr and bad in proc.stderr
    assert not (tmp_path / "out" / "gpu_suite.json").exists()  # (it stopped before any part ran)


def test_no_wheels_stops_with_what_to_do(tmp_path):
    proc = suite(tmp_path / "out", "--dry-run", GPU_SUITE_INSTALL="1", GPU_WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 2 and "benchmarks/gpu_wheels.py" in proc.stderr, proc.stderr[-2000:]
