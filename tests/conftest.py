"""Shared fixtures: a small demo dataset (generated once per session) and a CLI runner."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ports, prefork

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# One intra-op thread in the tests' processes and everything they start (set before anything imports torch). Their
# models and batches are tiny, and most runs share the 2 cores with their own loader workers or a second rank: two
# OpenMP threads per process spun against those. On the CI's 2 cores a third of the integration suite ran 20% faster
# with one (212 s against 265 s; benchmarks/RESULTS.md). OMP_NUM_THREADS set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A demo world small enough for tests: 2,000 training pairs in 4 shards of uneven size.
SMALL_DEMO = [
    "data.demo.num_train=2000",
    "data.demo.num_zeroshot=360",
    "data.demo.num_retrieval=200",
    "data.demo.shard_size=600",
]


def shared_dir(tmp_path_factory) -> Path:
    """A folder this session's pytest-xdist workers share (the session's own temporary folder without xdist):
    what a session fixture builds there with ``shared_run`` is built once for all workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_run(tmp_path_factory, name: str, build) -> Path:
    """``shared_dir/name``, made by ``build(path)`` once for all workers (the first to ask builds it; the others
    wait for it): a session fixture's reference run that tests only read."""
    path = shared_dir(tmp_path_factory) / name
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = path.with_name(path.name + ".done")
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # (what a failed build of an earlier worker left)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """CLIPKIT_CACHE, shared by the workers (the demo data sets are generated once, under clipkit's own lock)."""
    path = shared_dir(tmp_path_factory) / "clipkit-cache"
    path.mkdir(exist_ok=True)
    os.environ["CLIPKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def small_demo(cache_dir) -> Path:
    """The small demo data set, generated through the same code path as `clipkit train`."""
    from clipkit.data import ensure_demo
    from clipkit.data.config import DataConfig, DemoDataConfig

    cfg = DataConfig(
        cache_dir=str(cache_dir),
        demo=DemoDataConfig(num_train=2000, num_zeroshot=360, num_retrieval=200, shard_size=600),
    )
    return ensure_demo(cfg, say=lambda m: None)


# The data read in the training process itself: no loader or eval worker processes. A run with workers starts
# their fork server and the workers (under the tests' fork server the worker server is forked, not a fresh
# interpreter: tests/prefork.py), so the tests whose subject is not the loader append this. The sample order is
# the same with or without workers (docs/data.md), so their reference runs stay valid. The loader's own tests,
# the layouts, the signal and kill tests, the README and the typed-in-a-shell commands, and the session's demo run
# keep the default workers.
IN_PROCESS_DATA = ["data.num_workers=0", "eval.num_workers=0"]


# The end-of-run report (matplotlib's curves: ~2 s of a short run's ~6 s) is written only where a test names
# `logging.report`: run_cli appends this to a `train` that does not. The report's own tests
# (tests/integration/test_report.py), the README doc test, the commands typed in a shell and the launchers' runs
# keep the default (on).
NO_REPORT = ["logging.report=false"]

# The session's shared trained run: 40 steps of the small demo, checkpoints at 20 and 40, an eval at the end.
DEMO_RUN_ARGS = [
    *SMALL_DEMO,
    "train.steps=40",
    "train.checkpoint_every=20",
    "train.log_every=1",
    "optim.warmup_steps=5",
    "logging.progress=false",
]


@pytest.fixture(scope="session")
def demo_run(small_demo, tmp_path_factory):
    """(run dir, CompletedProcess) of one `clipkit train` every test that needs a trained model shares (all
    workers); tests must not write into it (copy it first)."""

    def build(run_dir: Path) -> None:
        proc = run_cli("train", f"hydra.run.dir={run_dir}", *DEMO_RUN_ARGS, check=True)
        for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            run_dir.with_name(f"demo-run.{name}").write_text(text)

    run_dir = shared_run(tmp_path_factory, "demo-run", build)
    outputs = (run_dir.with_name(f"demo-run.{name}").read_text() for name in ("stdout", "stderr"))
    return run_dir, subprocess.CompletedProcess(["clipkit", "train", *DEMO_RUN_ARGS], 0, *outputs)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False, python_flags: tuple = ()):
    """Runs `python [FLAGS] -m clipkit ARGS` as a process of its own; returns the CompletedProcess (text). Without
    interpreter flags the process is forked from the tests' fork server (``tests/prefork.py``: the same command,
    minus ~4 s of importing torch and open_clip each time); with them, or with CLIPKIT_TEST_PREFORK=0, it is
    a fresh interpreter. A ``train`` that does not name ``logging.report`` gets ``NO_REPORT``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if args and args[0] == "train" and not any(a.startswith("logging.report=") for a in args):
        args = (*args, *NO_REPORT)
    server = None if python_flags else prefork.client()
    if server is not None:
        proc = server.run(list(args), full_env, timeout)
    else:
        proc = subprocess.run(
            [sys.executable, *python_flags, "-m", "clipkit", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"clipkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def srun_tasks(
    ntasks: int, args: list[str], extra_env: dict | None = None, stopped_from_outside: bool = False
) -> list[subprocess.Popen]:
    """Starts what `srun --ntasks=N python -m clipkit ARGS` starts on one node: N tasks with SLURM's variables
    (and none of torchrun's), stdout/stderr piped. Each task is the tests' ``clipkit`` shim (``tests/prefork.py``:
    forked from the fork server, without ~4 s of imports), which passes on INT, TERM, USR1 and HUP and dies of
    the signal that killed its command (a fault hook's kill -9). A test that stops or kills a task from outside
    (SIGSTOP, SIGKILL: no process can pass those on) asks for real interpreters: ``stopped_from_outside``."""
    server = None if stopped_from_outside else prefork.client()
    program = [str(server.shim() / "clipkit")] if server else [sys.executable, "-m", "clipkit"]
    job_id = ports.slurm_job_id()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    slurm = {"SLURM_NTASKS": str(ntasks), "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job_id}
    return [
        subprocess.Popen(
            [*program, *args],
            env={**base, **slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), **(extra_env or {})},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for task in range(ntasks)
    ]


# The reliability table's rows from pytest-xdist's workers (make test runs the suite on 2): each worker sends its
# own at the end, the controller prints them all.
WORKER_ROWS: list[dict] = []
WORKER_MODES: set[str] = set()


def _reliability() -> tuple[list[dict], str] | None:
    harness = sys.modules.get("tests.reliability.harness")
    if harness is None or not harness.RESULTS:
        return None
    return harness.RESULTS, "long" if harness.LONG else "fast"


def pytest_sessionfinish(session):
    found = _reliability()
    if found is not None and hasattr(session.config, "workeroutput"):  # (a worker: hand the rows over)
        session.config.workeroutput["reliability"] = json.dumps({"rows": found[0], "mode": found[1]})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    sent = json.loads(getattr(node, "workeroutput", {}).get("reliability", "null"))
    if sent:
        WORKER_ROWS.extend(sent["rows"])
        WORKER_MODES.add(sent["mode"])


def pytest_terminal_summary(terminalreporter):
    """The reliability suite's table (case, trials, passed, figure), when that suite ran."""
    found = _reliability()
    rows, mode = found if found is not None else (WORKER_ROWS, "long" if "long" in WORKER_MODES else "fast")
    if not rows:
        return
    terminalreporter.section(f"reliability ({mode} mode)")
    terminalreporter.write_line("| case | trials | passed | figure |")
    terminalreporter.write_line("|---|---:|---:|---|")
    for r in rows:
        terminalreporter.write_line(f"| {r['case']} | {r['trials']} | {r['passed']} | {r['figure']} |")
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "reliability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": mode, "results": rows}, indent=1))


@pytest.fixture(scope="session")
def tower(tmp_path_factory) -> tuple[str, dict]:
    """A "pretrained" model for LiT and LoRA runs: clipkit-tiny at another seed, as a safetensors file, and its
    weights."""
    import torch
    from safetensors.torch import load_file, save_file

    from clipkit.model import build
    from clipkit.model_config import ModelConfig

    torch.manual_seed(1234)
    weights = build(ModelConfig()).model.state_dict()
    path = tmp_path_factory.mktemp("pretrained") / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return str(path), load_file(str(path))
