"""A non-editable install (the built wheel) finds its presets and model configs from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_presets_and_runs_from_elsewhere(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("clipkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")):
        assert f"clipkit/conf/{conf}" in names, conf
    assert "clipkit/model_configs/clipkit-tiny.json" in names
    # every module of the source tree (a package missing from pyproject's list would be silently left out)
    for module in sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "clipkit").rglob("*.py")):
        assert module in names, module
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import clipkit.train, clipkit.cli as c; from clipkit.cli import compose; cfg, d = compose(['model=vit_b32']); "
        "print(c.conf_dir()); print(cfg.model.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(site / "clipkit" / "conf"), "ViT-B-32"]
