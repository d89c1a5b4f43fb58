"""Commands typed as users type them, through a real shell (``bash -c``): brace patterns quoted, half-quoted
and unquoted, globs; img2dataset shards with the default caption key; a wrong caption key; interrupts and a
stalled stream; a main process killed with SIGKILL leaves no loader worker behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipkit.data.shards import expand_spec
from tests import prefork
from tests.shardsets import img2dataset_shards

BIN = Path(sys.executable).parent
QUIET = "logging.progress=false logging.report=false eval.zeroshot.dataset= eval.retrieval.dataset="


def bash(command: str, cwd: Path, timeout: float = 600, installed: bool = False) -> subprocess.CompletedProcess:
    """``bash -c COMMAND``. The ``clipkit`` it finds is the tests' shim (``tests/prefork.py``: the command as the
    shell expanded it, run without ~4 s of imports), or with ``installed`` the installed console script, as the
    shard-spec cases and the background (``spawn``) cases run it."""
    server = None if installed else prefork.client()
    path = [str(server.shim())] if server else []
    env = {**os.environ, "PATH": ":".join([*path, str(BIN), os.environ["PATH"]]), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def spawn(command: str, cwd: Path) -> subprocess.Popen:
    """clipkit in the background; its stderr goes to ``cwd/stderr.txt`` (a pipe would stay open as long as any
    child holds it, e.g. the command of a ``pipe:`` shard)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    # exec: the shell becomes clipkit, so signals reach it as they would from a terminal or a scheduler
    with open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=err, stderr=err, preexec_fn=_as_from_a_terminal
        )


def _as_from_a_terminal() -> None:
    """Ctrl-C's default disposition, as a terminal's foreground command has it, however pytest itself was started
    (a shell's background job inherits SIGINT ignored, and so would clipkit: Python keeps an ignored SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running after {timeout} s: {(cwd / 'stderr.txt').read_text()[-3000:]}") from None
    return (cwd / "stderr.txt").read_text()


@pytest.fixture(scope="module")
def i2d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img2dataset")
    img2dataset_shards(root / "shards", num_shards=4, per_shard=40)
    return root


def resolved_train(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("train:") and "/" in ln)
    return line.split("train:", 1)[1].strip().strip("'\"")


@pytest.mark.parametrize(
    "typed",
    [
        "data.train='{d}/{{00000..00003}}.tar'",  # the README's form: the shell strips the quotes
        "\"data.train='{d}/{{00000..00003}}.tar'\"",  # quoted for Hydra by the user
        "data.train={d}/{{00000..00003}}.tar",  # unquoted: bash expands it into four words
        "data.train={d}/*.tar",  # a glob the shell leaves alone (no file matches the whole word)
        'data.train="{d}/{{00000..00001}}.tar::{d}/{{00002..00003}}.tar"',  # two sources
    ],
)
def test_shard_specs_as_typed(i2d, typed):
    d = i2d / "shards"
    proc = bash(f"clipkit train --cfg {typed.format(d=d)}", cwd=i2d, timeout=600, installed=True)
    urls = [u for src in expand_spec(resolved_train(proc)) for u in src.urls]
    assert urls == [str(d / f"{i:05d}.tar") for i in range(4)]


def test_img2dataset_shards_train_out_of_the_box(i2d, tmp_path):
    """Default caption key on img2dataset shards (caption in KEY.txt and KEY.json 'caption'), a smoke-run step
    count smaller than the default warmup, the README's quoting."""
    d = i2d / "shards"
    proc = bash(
        f"clipkit train data=shards data.train='{d}/{{00000..00003}}.tar' train.steps=3 "
        f"train.global_batch_size=32 hydra.run.dir={tmp_path} {QUIET}",
        cwd=i2d,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warming up over all 3 steps" in proc.stderr
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["data_errors"] == {}


def test_wrong_caption_key_stops_at_once_naming_the_members(i2d, tmp_path):
    """At once, as what it stands for: the run stops on the caption probe of the first 16 samples, before any
    step or checkpoint (a hang would meet the generous timeout)."""
    d = i2d / "shards"
    proc = bash(
        f"clipkit train data=shards data.train='{d}/{{00000..00003}}.tar' data.caption_key=json:captions "
        f"train.steps=3 train.global_batch_size=32 hydra.run.dir={tmp_path} {QUIET}",
        cwd=i2d,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
    assert not any("loss" in json.loads(line) for line in _lines(tmp_path / "metrics.jsonl"))
    assert "none of the first 16 samples has a caption" in proc.stderr
    assert "json {caption, error_message, height" in proc.stderr and "txt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_clipkit_shards_output_trains_with_default_caption_key(tmp_path):
    """A folder of images with .txt captions -> `clipkit shards` -> `clipkit train` with no caption setting."""
    from tests.shardsets import COLOURS, jpeg

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(64):
        name = list(COLOURS)[i % 4]
        (src / f"img{i:03d}.jpg").write_bytes(jpeg(COLOURS[name], seed=i))
        (src / f"img{i:03d}.txt").write_text(f"a {name} picture")
    made = bash(f"clipkit shards {src} {tmp_path / 'out'} --shard-size 20 --procs 1", cwd=tmp_path, timeout=600)
    assert made.returncode == 0, made.stderr
    proc = bash(
        f"clipkit train data.train={tmp_path / 'out'}/*.tar train.steps=2 train.global_batch_size=16 "
        f"hydra.run.dir={tmp_path / 'run'} {QUIET}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), e.g. loader workers under their fork server."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


# Two shards that never deliver a byte (a storage that accepts the connection and then says nothing) for far
# longer than any of the tests below may wait: a run that ends did so by its own signal or stall handling.
STALLED = "data.train='pipe:sleep 300{5,6}' data.num_workers=2 train.steps=5"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _descendants_until_exit(proc: subprocess.Popen, timeout: float) -> set[int]:
    """Every process that was below ``proc`` while it ran (up to ``timeout``)."""
    seen: set[int] = set()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        seen |= _descendants(proc.pid)
        time.sleep(0.1)
    return seen


def _kill_all(pids: set[int]) -> None:
    """Ends what a test left running on purpose (the `sleep` writers of pipe: shards outlive their reader)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_interrupt_while_waiting_for_data_ends_the_run(tmp_path, sig, code):
    """Ctrl-C or SIGTERM while every worker is stuck reading a stream that never delivers: the signal ends the run
    (the stream would not end for 50 minutes) with a message, writes no checkpoint, and leaves no worker behind."""
    proc = spawn(f"clipkit train {STALLED} hydra.run.dir={tmp_path} {QUIET}", cwd=tmp_path)
    assert _wait_for(lambda: "GFLOPs forward" in (tmp_path / "stderr.txt").read_text(), 600), "the loop did not start"
    assert _wait_for(lambda: len(_descendants(proc.pid)) >= 4, 600), "workers did not start"
    time.sleep(1)
    workers = _descendants(proc.pid)
    try:
        proc.send_signal(sig)
        err = finish(proc, tmp_path, 600)
        assert proc.returncode == code, err[-2000:]
        assert ("interrupted" if sig == signal.SIGINT else "while starting or waiting for data") in err
        assert not (tmp_path / "checkpoints").exists()  # (the run dir is tmp_path)
        assert _wait_for(lambda: not _alive(_pythons(workers)), 600), _alive(_pythons(workers))
    finally:
        _kill_all(workers)


def _pythons(pids: set[int]) -> set[int]:
    """The Python processes among ``pids``: loader workers, their fork server, the resource tracker. (The
    commands of pipe: shards, `sh -c sleep ...`, outlive their reader as any pipe writer does.)"""
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/comm").read_text().strip().startswith("python"):
                out.add(p)
        except OSError:
            pass
    return out


def test_stalled_stream_stops_naming_stream_shard_and_position(tmp_path):
    """The stall watchdog, not the stream's end (50 minutes away), ends the run, naming where it waited."""
    proc = spawn(f"clipkit train {STALLED} data.stall_timeout_s=3 hydra.run.dir={tmp_path} {QUIET}", cwd=tmp_path)
    writers = _descendants_until_exit(proc, 600)
    try:
        stderr = finish(proc, tmp_path, 600)
    finally:
        _kill_all(writers)  # the `sleep` writers of the pipe: shards, orphaned when their reader ends
    assert proc.returncode == 1, stderr[-2000:]
    assert "no batch for data.stall_timeout_s=3 s: loader stream 0 (rank 0, worker 0)" in stderr
    assert "epoch 0, position 0, reading pipe:sleep 300" in stderr and "at its sample 0" in stderr


@pytest.mark.parametrize("kind", ["good", "bad"])
def test_workers_die_with_a_killed_main_process(i2d, tmp_path, kind):
    """SIGKILL of the training process (an OOM kill, a node failure): its loader workers notice within
    seconds, whether they are delivering batches (good data) or looping over bad samples."""
    d = i2d / "shards"
    if kind == "bad":  # 49 of 50 images undecodable: the workers spin over bad samples, rarely forming a batch
        from clipkit.data.writer import write_shard
        from tests.shardsets import jpeg

        good = jpeg((200, 30, 30))
        d = tmp_path / "bad"
        samples = [
            {"__key__": f"k{i:06d}", "jpg": good if i % 50 == 0 else b"x" * 200, "txt": "t"} for i in range(60000)
        ]
        write_shard(d / "00000.tar", samples)
    proc = spawn(
        f"clipkit train data.train='{d}/*.tar' data.max_bad_fraction=1.0 data.num_workers=2 train.steps=100000 "
        f"train.global_batch_size=64 data.shuffle_window=0 hydra.run.dir={tmp_path / 'run'} {QUIET}",
        cwd=tmp_path,
    )
    assert _wait_for(lambda: len(_descendants(proc.pid)) >= 3, 600), "workers did not start"
    time.sleep(3)
    workers = _descendants(proc.pid)
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
    proc.kill()
    proc.wait()
    try:  # (they notice at once through a pidfd; the bound is for a hang, not a speed)
        assert _wait_for(lambda: not _alive(workers), 300), f"left behind: {_alive(workers)}"
    finally:
        _kill_all(workers)


def test_own_data_evaluates_its_held_out_shards_and_never_the_demo(i2d, tmp_path):
    """Training on one's own shards: no demo data is generated; with data.holdout_fraction=0.25 every 4th shard
    (here 00003) is kept out of training (no trained key comes from it) and retrieval runs on it; without a
    fraction or an eval set, nothing is evaluated and the run says so."""
    cache = tmp_path / "cache"
    common = (
        f"CLIPKIT_CACHE={cache} clipkit train 'data.train={i2d}/shards/{{00000..00003}}.tar' train.steps=4 "
        "train.global_batch_size=16 train.record_keys=true logging.progress=false logging.report=false"
    )
    proc = bash(f"{common} data.holdout_fraction=0.25 hydra.run.dir={tmp_path}/held", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "held" / "summary.json").read_text())
    assert list(summary["eval"]) == ["retrieval"] and summary["eval"]["retrieval"]["num_images"] == 40
    assert "1 held-out shards of data.train" in summary["evaluated_on"]["retrieval"]
    assert "evaluated on: retrieval: 1 held-out shards" in proc.stdout
    trained = [
        k
        for line in (tmp_path / "held" / "keys" / "rank_000.jsonl").read_text().splitlines()
        for _, k in json.loads(line)["keys"]
    ]
    assert len(trained) == 64 and not any(k.startswith("00003") for k in trained)

    proc = bash(f"{common} hydra.run.dir={tmp_path}/none", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no eval set: training on your own data evaluates nothing" in proc.stderr
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["eval"] == {}
    assert not any(cache.glob("demo-*")), list(cache.iterdir())  # the 24,000 demo images were never generated
