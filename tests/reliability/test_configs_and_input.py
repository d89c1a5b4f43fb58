"""Cases 6 and 8: bad configs fail fast, before anything spawns, naming the field; untrusted input executes no
code and writes nothing."""

from __future__ import annotations

import io
import os
import pickle
import random
import sys
import tarfile
import time
import uuid

import pytest

from clipkit.cli import main
from tests.conftest import run_cli
from tests.reliability.harness import LONG, record, train
from tests.unit.test_config import BAD_CONFIGS

pytestmark = pytest.mark.reliability


def test_bad_configs_fail_fast_naming_the_field(capsys):
    times, named = [], 0
    for overrides, needle in BAD_CONFIGS:
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as exc:
            main(["train", *overrides])
        times.append(time.perf_counter() - t0)
        err = capsys.readouterr().err
        named += exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1
    # As separate processes too (what a user runs): all of them in long mode, three otherwise.
    cases = BAD_CONFIGS if LONG else BAD_CONFIGS[:3]
    proc_times = []
    for overrides, needle in cases:
        t0 = time.perf_counter()
        proc = run_cli("train", *overrides, timeout=60)
        proc_times.append(time.perf_counter() - t0)
        named += proc.returncode == 2 and needle in proc.stderr
    n = len(BAD_CONFIGS) + len(cases)
    fig = (
        f"{len(BAD_CONFIGS)} distinct mistakes; max {max(times):.2f} s in-process, {max(proc_times):.2f} s as a process"
    )
    record("bad configs", n, named, fig)
    assert len(BAD_CONFIGS) >= 25 and named == n and max(proc_times) < 3.0 and max(times) < 3.0


_AUDIT: dict = {"sink": None}


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _AUDIT["sink"] is not None:
        _AUDIT["sink"].append(str(args[0]))


sys.addaudithook(_audit)  # (audit hooks cannot be removed; it records only while a sink is set)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_untrusted_input(small_demo, tmp_path):
    checks = {}
    # 1. A checkpoint whose engine.pt carries code: refused without running it (weights_only), even with a
    #    manifest that matches (an attacker can rewrite that too).
    run = tmp_path / "run"
    assert train(run, "train.steps=4").returncode == 0
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    ckpt = run / "checkpoints" / "step_00000004"
    with open(ckpt / "engine.pt", "wb") as f:
        pickle.dump({"optimizer": _Exploit(marker)}, f)
    from clipkit import checkpoint

    manifest = checkpoint.load_json(ckpt / "manifest.json")
    manifest["files"]["engine.pt"] = {
        "size": (ckpt / "engine.pt").stat().st_size,
        "sha256": checkpoint._sha256(ckpt / "engine.pt"),
    }
    checkpoint.save_json(ckpt / "manifest.json", manifest)
    proc = train(run, "train.steps=8")
    checks["pickle"] = proc.returncode == 1 and not marker.exists() and "engine.pt" in proc.stderr
    # 2. pipe: URLs refused when the safe switch is on.
    proc = run_cli("train", "data.allow_pipe=false", "data.train=pipe:cat /etc/passwd", timeout=60)
    checks["pipe"] = proc.returncode == 2 and "data.train" in proc.stderr and "pipe" in proc.stderr
    # 3. Member names inside tar shards are never used as paths: a shard with ../ names trains, writes nothing.
    from tests.unit.test_data_faults import _jpeg

    evil = f"../../../tmp/evil-{uuid.uuid4().hex}"
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rng = random.Random(0)
    with tarfile.open(shard_dir / "00000.tar", "w") as tar:
        for i in range(64):
            for ext, data in (("jpg", _jpeg(rng)), ("txt", f"caption {i}".encode())):
                name = f"{evil}{i}.{ext}" if i % 8 == 0 else f"sample{i:03d}.{ext}"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    # Read it as training and eval do, with an audit hook on every file open: the only file opened is the shard
    # itself (the real risk is code that extracts, or opens a path built from a member name), and the hostile
    # names stay plain keys of samples that are delivered whole.
    from clipkit.data.stream import iter_shard

    opened: list[str] = []
    _AUDIT["sink"] = opened
    try:
        samples = list(iter_shard(str(shard_dir / "00000.tar")))
    finally:
        _AUDIT["sink"] = None
    hostile = [s for s in samples if s["__key__"].startswith("../")]
    checks["tar paths"] = (
        len(samples) == 64
        and len(hostile) == 8
        and all({"jpg", "txt"} <= set(s) for s in hostile)
        and {p for p in opened if "evil" in p or ".." in p} == set()
        and any(p.endswith("00000.tar") for p in opened)
    )
    record(
        "untrusted input",
        len(checks),
        sum(checks.values()),
        ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in checks.items()),
    )
    assert all(checks.values()), (checks, proc.stderr[-1500:], opened)
