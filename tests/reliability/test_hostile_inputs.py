"""Case 9: hostile and careless inputs (issue 32), each as the process a user runs. What must hold for every one:
nothing the user had is lost, no silent wrong result, no hang, and a mistake ends in one line naming the cause
(and the field, for config), a non-zero exit code and no Python traceback. Each case is a row of the table's
figure; a case that fails names itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipkit.data.writer import write_shard, write_sizes_file
from tests import prefork
from tests.conftest import run_cli
from tests.reliability.harness import RUN_ARGS, record, train, train_in_process
from tests.shardsets import COLOURS, gzip_bomb, jpeg

pytestmark = pytest.mark.reliability
QUIET = ["logging.progress=false", "logging.report=false", "eval.zeroshot.dataset=", "eval.retrieval.dataset="]


def one_line(proc: subprocess.CompletedProcess, code: int | None = None, needle: str = "") -> bool:
    """Failed as a user's mistake should: the exit code (any non-zero if None), no traceback, the needle."""
    ok_code = proc.returncode != 0 if code is None else proc.returncode == code
    return ok_code and "Traceback" not in proc.stderr and needle in proc.stderr


def shards(root: Path, n: int = 2, per: int = 40, sizes: dict | None = None) -> Path:
    for s in range(n):
        samples = [
            {"__key__": f"s{s}_{i:04d}", "jpg": jpeg(list(COLOURS.values())[i % 4], seed=i), "txt": f"item {i}"}
            for i in range(per)
        ]
        write_shard(root / f"{s:05d}.tar", samples)
    write_sizes_file(root, sizes or {f"{s:05d}.tar": per for s in range(n)})
    return root


@pytest.fixture(scope="module")
def trained(small_demo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert train_in_process(run, "train.steps=4").returncode == 0  # (the cases with data keep the workers)
    return run


def test_hostile_inputs(trained, small_demo, tmp_path):
    checks: dict[str, bool] = {}
    ckpt = sorted((trained / "checkpoints").iterdir())[-1]

    # --- data loss ---------------------------------------------------------------------------------------------
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    proc = train(trained, "train.steps=4", "train.resume=never")
    checks["resume=never on old checkpoints refused"] = (
        one_line(proc, 1, "holds checkpoints of an earlier run")
        and sorted(p.name for p in (trained / "checkpoints").iterdir()) == before
    )
    again = tmp_path / "again"
    shutil.copytree(trained, again)
    proc = train_in_process(again, "train.steps=4", "train.resume=restart")
    aside = list(tmp_path.glob("again.old-*"))
    checks["resume=restart moves the old run aside"] = (
        proc.returncode == 0
        and len(aside) == 1
        and sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == before
    )
    busy = tmp_path / "busy"  # a run that waits for data forever holds its run dir; a second one is refused
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["train", f"hydra.run.dir={busy}", "data.train=pipe:sleep 600", *QUIET]
    server = prefork.client()  # (forked from the fork server: the imports' ~4 s; or, without one, a real process)
    if server:
        first = server.start(args, env)
    else:
        cmd = [sys.executable, "-m", "clipkit", *args]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (busy / ".clipkit.lock").is_file() or not (busy / ".clipkit.lock").read_text():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        proc = run_cli("train", f"hydra.run.dir={busy}", *QUIET, timeout=600)
        checks["two runs on one run dir: the second refused"] = one_line(proc, 1, f'pid": {first.pid}')
    finally:
        first.kill()
        first.wait(60)
    proc = run_cli("export", f"checkpoint={trained}", "format=open_clip", f"out={ckpt}", "overwrite=true")
    checks["export into a checkpoint dir refused"] = one_line(proc, 2, "export to another folder")
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        (src / f"p{i}.jpg").write_bytes(jpeg((200, 30, 30), seed=i))
        (src / f"p{i}.txt").write_text("a red square")
    out = shards(tmp_path / "oldshards", n=3, per=5)
    proc = run_cli("shards", str(src), str(out), "--shard-size", "3", "--procs", "1")
    kept = sorted(p.name for p in out.iterdir())
    proc2 = run_cli("shards", str(src), str(out), "--shard-size", "3", "--procs", "1", "--overwrite")
    checks["clipkit shards into a non-empty folder"] = (
        one_line(proc, 2, "is not empty")
        and "00002.tar" in kept
        and proc2.returncode == 0
        and sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]  # (no stale 00002.tar)
        and json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3}
    )

    # --- silent wrong results ----------------------------------------------------------------------------------
    planted = tmp_path / "planted"
    shutil.copytree(trained, planted)
    pckpt = sorted((planted / "checkpoints").iterdir())[-1]
    shutil.copy(pckpt / "model.safetensors", pckpt / "ema.safetensors")  # not in the manifest
    proc = run_cli("export", f"checkpoint={planted}", "format=open_clip", f"out={tmp_path / 'ema'}", "weights=ema")
    checks["a file planted in a checkpoint is not trusted"] = one_line(proc, 2, "has no EMA weights")
    folder = tmp_path / "classes"
    for name in ("red circle", "blue square"):
        (folder / name).mkdir(parents=True)
        (folder / name / "a.jpg").write_bytes(jpeg((9, 9, 9)))
    dup = tmp_path / "classnames.txt"
    dup.write_text("red circle\nblue square\nred circle\n")
    proc = run_cli(
        "eval", f"checkpoint={trained}", f"eval.zeroshot.dataset={folder}", f"eval.zeroshot.classnames={dup}"
    )
    checks["a duplicated class name refused"] = one_line(proc, 2, "listed twice")
    under = shards(tmp_path / "under", n=1, per=40, sizes={"00000.tar": 10})
    run = tmp_path / "under-run"
    # (4 streams over the 10 announced samples: the last, 3 samples long, finds the 30 more after its third)
    proc = train(run, f"data.train={under}/00000.tar", "train.steps=4", "train.global_batch_size=4", "data.mode=epoch")
    summary = json.loads((run / "summary.json").read_text()) if proc.returncode == 0 else {}
    counted = summary.get("data_errors_by_epoch", {}).get("0", {}).get("unannounced")
    checks["an under-reporting sizes.json is counted"] = (
        counted == 30 and "30 more samples than announced" in proc.stderr
    )
    bad_sizes = shards(tmp_path / "badsizes", n=1, per=8)
    (bad_sizes / "sizes.json").write_text('{"00000.tar": ')
    proc = train(tmp_path / "bs-run", f"data.train={bad_sizes}/00000.tar", "train.steps=1")
    checks["a malformed sizes.json: one line"] = one_line(proc, 1, "sizes.json is not a sizes file")
    proc = run_cli("train", "train.device=cuda", *RUN_ARGS[:4], f"hydra.run.dir={tmp_path / 'cuda'}")
    checks["train.device=cuda without a GPU: one line"] = one_line(proc, 2, "no CUDA device is visible")

    # --- hangs -------------------------------------------------------------------------------------------------
    bomb = tmp_path / "bomb.yaml"
    levels = [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    bomb.write_text("\n".join(['a: &a ["x","x","x","x","x","x","x","x","x"]', *levels]) + "\n")
    proc = run_cli("eval", f"checkpoint={trained}", f"eval.suite={bomb}", timeout=600)
    checks["a YAML alias bomb as eval.suite"] = one_line(proc, 2, "aliases")
    proc = train(tmp_path / "big", "train.global_batch_size=4096", "train.steps=1")
    checks["a batch larger than the data"] = one_line(proc, 1, "more than the")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = train(tmp_path / "silent", f"data.train='{url}/{{00000..00003}}.tar'", "data.stall_timeout_s=5")
    checks["a remote that never answers: one line naming it"] = one_line(proc, 1, url)
    gz = tmp_path / "gz"
    gz.mkdir()
    n = gzip_bomb(gz / "00000.tar.gz", gib=2, before=8)  # sample 8's image decompresses to 2 GiB
    write_sizes_file(gz, {"00000.tar.gz": n})
    run = tmp_path / "gz-run"
    proc = train(
        run,
        f"data.train={gz}/00000.tar.gz",
        "train.steps=3",
        "train.global_batch_size=4",
        "data.max_bad_fraction=0.9",
        "data.streams=1",  # (one stream reads all 17: more would leave the ones behind the bomb nothing usable)
    )
    summary = json.loads((run / "summary.json").read_text()) if proc.returncode == 0 else {}
    checks["a .tar.gz member of 2 GiB: bounded, counted"] = (
        summary.get("data_errors_by_epoch", {}).get("0") == {"missing": n - 8}
        and "larger than data.max_member_mb=256" in proc.stderr
    )

    # --- tracebacks instead of one line --------------------------------------------------------------------------
    proc = run_cli("train", "data.train=/etc/passwd", f"hydra.run.dir={tmp_path / 'p'}")
    checks["data.train=/etc/passwd"] = one_line(proc, 2, "data.train")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "00000.tar").write_bytes(b"")
    proc = train(tmp_path / "e-run", f"data.train={empty}/00000.tar", "train.steps=1")
    checks["a 0-byte tar"] = one_line(proc)
    for name, target in (("a file", ckpt / "config.yaml"), ("a non-run dir", tmp_path), ("a damaged checkpoint", None)):
        if target is None:
            damaged = tmp_path / "damaged"
            shutil.copytree(ckpt, damaged)
            (damaged / "model.safetensors").write_bytes(b"x")
            target = damaged
        ok = True
        for verb, extra in (("eval", []), ("export", [f"out={tmp_path / 'x'}"])):
            ok &= one_line(run_cli(verb, f"checkpoint={target}", *extra))
        checks[f"checkpoint= {name}"] = ok
    other = tmp_path / "other"
    assert train_in_process(other, "train.steps=2", "model=small").returncode == 0
    proc = train(tmp_path / "init", f"model.init_from={other}", "train.steps=1")
    checks["model.init_from of another architecture"] = one_line(proc, 2, "holds weights of another model")
    pickled = tmp_path / "weights.pt"
    pickled.write_bytes(b"\x80\x04\x95not really a pickle")
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    ok = True
    for f in (pickled, text):
        ok &= one_line(run_cli("train", f"model.pretrained={f}", *RUN_ARGS[:4], f"hydra.run.dir={tmp_path / 'pt'}"), 2)
    checks["model.pretrained that is not weights"] = ok
    afile = tmp_path / "afile"
    afile.write_text("mine")
    proc = run_cli("export", f"checkpoint={trained}", f"out={afile}")
    checks["export out= a file"] = one_line(proc, 2, "is a file") and afile.read_text() == "mine"
    # (a read-only folder cannot be made as root, who writes anyway; a file where the folder should be can)
    proc = run_cli("eval", f"checkpoint={trained}", f"eval.output={afile / 'eval.json'}")
    checks["an eval.output that cannot be written: stops before computing"] = (
        one_line(proc, 1, str(afile)) and "evaluation of" not in proc.stdout
    )
    copy = tmp_path / "report-run"
    shutil.copytree(trained, copy)
    (copy / "summary.json").write_text('{"step": 4, "ev')
    proc = run_cli("report", str(copy))
    checks["a truncated summary.json in clipkit report"] = one_line(proc, 1, "not valid JSON")

    failed = [k for k, v in checks.items() if not v]
    figure = f"{len(checks)} cases as processes; " + ("all held" if not failed else "FAILED: " + "; ".join(failed))
    record("hostile inputs", len(checks), sum(checks.values()), figure)
    assert not failed, failed
