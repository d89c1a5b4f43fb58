"""The wheels carried to the GPU machine install there (issue 27): ``benchmarks/gpu_wheels.py`` builds the set from
PyPI (CPython 3.12, manylinux x86_64, nothing the GPU image has) and checks it; here the set is built for real
and its check is shown to catch what made the first GPU install fail: a wheel for the wrong Python, two versions
of one package, a missing dependency."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_wheels  # noqa: E402  (benchmarks/gpu_wheels.py)

# `make test-all`: building the set downloads some 15 wheels from PyPI (~70 s); make test stays offline.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-wheels") / "wheels"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_wheels.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pip resolves" in proc.stdout
    return out


@pytest.fixture(scope="module")
def versions() -> dict[str, str]:
    return {name: m["version"] for name, m in gpu_wheels.resolve_here([]).items()}


def image_and_left_out(versions) -> dict:
    return {**gpu_wheels.image_packages(), **{n: versions[n] for n in gpu_wheels.LEFT_OUT}}


def test_the_set_installs_on_the_gpu_machines_python(wheels, versions):
    names = sorted(w.name for w in wheels.iterdir())
    assert all(n.endswith(".whl") and gpu_wheels.installable(n) for n in names), names
    carried = {n.split("-")[0].lower() for n in names}
    assert {"clipkit", "open_clip_torch", "webdataset", "hydra_core", "omegaconf", "deepspeed"} <= carried
    assert not carried & {"torch", "torchvision", "numpy", "triton", "pyyaml", "regex", "transformers"}
    assert gpu_wheels.check(wheels, image_and_left_out(versions), [], versions) == []


def test_the_check_catches_a_wheel_for_another_python(wheels, versions, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(wheels, bad)
    (core,) = bad.glob("pydantic_core-*.whl")
    core.unlink()
    version = core.name.split("-")[1]
    target = ["--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux2014_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(bad)]
        + [f"pydantic_core=={version}"],
        check=True,
        capture_output=True,
    )
    problems = gpu_wheels.check(bad, image_and_left_out(versions), [], versions)
    assert any("cp311" in p and "does not install" in p for p in problems), problems
    assert any("cannot resolve" in p for p in problems), problems  # (pip finds no pydantic_core for 3.12)


def test_the_check_catches_two_versions_and_a_missing_package(wheels, versions, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(wheels, bad)
    (webdataset,) = bad.glob("webdataset-*.whl")
    shutil.copy(webdataset, bad / webdataset.name.replace(webdataset.name.split("-")[1], "0.2.86"))
    next(bad.glob("omegaconf-*.whl")).unlink()
    problems = gpu_wheels.check(bad, image_and_left_out(versions), [], versions)
    assert any(p.startswith("webdataset: 2 versions") for p in problems), problems
    assert any("cannot resolve" in p and "omegaconf" in p for p in problems), problems
