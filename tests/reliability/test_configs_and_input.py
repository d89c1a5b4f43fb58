"""Cases 6 and 8: bad configs fail fast, before anything spawns, naming the field; untrusted input executes no
code and writes nothing."""

from __future__ import annotations

import io
import os
import pickle
import random
import sys
import tarfile
import uuid

import pytest

from clipkit.cli import main
from tests.conftest import run_cli
from tests.reliability.harness import LONG, record, train
from tests.unit.test_config import BAD_CONFIGS

pytestmark = pytest.mark.reliability


HEAVY = ("torch", "open_clip", "deepspeed", "webdataset", "numpy", "wandb", "transformers")


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules a ``python -X importtime`` process imported (its stderr trace)."""
    return {
        line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")
    }


def test_bad_configs_fail_fast_naming_the_field(capsys, monkeypatch, tmp_path):
    """Fails fast, checked as what it stands for, not in seconds: the one-line error comes before the run
    directory, a process group, a model or a loader exist; as a process, before torch (or any other heavy
    library) is even imported."""
    import torch.distributed as dist

    import clipkit.cli

    started = []
    monkeypatch.setattr(clipkit.cli, "_train", lambda cfg, run_dir: started.append(run_dir))
    named = early = 0
    for i, (overrides, needle) in enumerate(BAD_CONFIGS):
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(SystemExit) as exc:
            main(["train", f"hydra.run.dir={run_dir}", *overrides])
        err = capsys.readouterr().err
        named += exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1
        early += not started and not run_dir.exists() and not dist.is_initialized()
    # As separate processes too (what a user runs): all of them in long mode, three plus the shard-spec ones
    # otherwise; -X importtime traces every module the process imported.
    cases = BAD_CONFIGS if LONG else BAD_CONFIGS[:3] + [c for c in BAD_CONFIGS if c[0][0].startswith("data.train=")]
    heavy_seen = set()
    for overrides, needle in cases:
        proc = run_cli("train", *overrides, timeout=300, python_flags=("-X", "importtime"))
        heavy = {m for m in imported_modules(proc.stderr) if m.split(".")[0] in HEAVY}
        heavy_seen |= heavy
        message = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
        named += proc.returncode == 2 and needle in proc.stderr and len(message) == 1
        early += not heavy
    n = len(BAD_CONFIGS) + len(cases)
    fig = (
        f"{len(BAD_CONFIGS)} distinct mistakes, each one line naming the field before a run dir, process group, "
        f"model or loader exists; {len(cases)} as processes, none importing {'/'.join(HEAVY[:3])}/..."
    )
    record("bad configs", n, min(named, early), fig)
    assert len(BAD_CONFIGS) >= 25 and named == n and early == n, (named, early, n, sorted(heavy_seen)[:10])


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
    proc = run_cli("train", "data.allow_pipe=false", "data.train=pipe:cat /etc/passwd", timeout=600)
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
