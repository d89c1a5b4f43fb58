"""Preemption and failure: a signal on one rank checkpoints every rank and resumes exactly; a stalled rank does not
hang the others past parallel.timeout_s. Ranks are started as SLURM tasks (fake srun), i.e. without torchrun's
agent, so nothing but clipkit itself reacts to the signal or the stall."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

from tests.conftest import IN_PROCESS_DATA, SMALL_DEMO, srun_tasks

STEPS = 14
ARGS = [
    *SMALL_DEMO,
    f"train.steps={STEPS}",
    "train.global_batch_size=64",
    "train.checkpoint_every=1000",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
]


def logged_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if "loss" in r]  # (not the eval records)


def wait_for_step(run_dir: Path, step: int, procs, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in logged_steps(run_dir)):
        assert time.monotonic() < deadline, "run did not reach the step in time"
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.2)


def finish(procs, timeout: float = 900) -> list[tuple[int, str]]:
    return [(p.wait(timeout), p.communicate()[1]) for p in procs]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def test_sigterm_on_one_rank_checkpoints_all_and_resumes_exactly(small_demo, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for rc, err in finish(srun_tasks(2, ["train", f"hydra.run.dir={ref_dir}", *ARGS])):
        assert rc == 0, err[-2000:]

    # A real SIGTERM to rank 1 only, sent after its step 5 (the fault hook signals the process itself, so the
    # point is the same on any machine): rank 0 learns it at the next step-boundary agreement.
    procs = srun_tasks(
        2, ["train", f"hydra.run.dir={run_dir}", *ARGS], extra_env={"CLIPKIT_FAULTS": "sigterm:step@5/1"}
    )
    (rc0, err0), (rc1, err1) = finish(procs)
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    assert "SIGTERM: stopped after step" in err0
    (saved,) = checkpoints(run_dir)
    stopped_at = int(saved.removeprefix("step_"))
    assert stopped_at == 10, stopped_at  # the next agreement (parallel.signal_check_every=10)

    for rc, err in finish(srun_tasks(2, ["train", f"hydra.run.dir={run_dir}", *ARGS])):
        assert rc == 0, err[-2000:]
    assert [r["loss"] for r in logged_steps(run_dir)] == [r["loss"] for r in logged_steps(ref_dir)]


def test_sigusr1_checkpoints_and_requeues_the_slurm_job(small_demo, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    env["CLIPKIT_FAULTS"] = "sigusr1:step@3"  # a real SIGUSR1 after step 3, on any machine
    (proc,) = srun_tasks(1, ["train", f"hydra.run.dir={tmp_path / 'run'}", *ARGS, *IN_PROCESS_DATA], extra_env=env)
    ((rc, err),) = finish([proc])
    assert rc == 0 and "SIGUSR1: stopped after step" in err, err[-2000:]
    assert checkpoints(tmp_path / "run") in (["step_00000003"], ["step_00000004"])
    assert (tmp_path / "scontrol.log").read_text().split()[0] == "requeue"


def test_a_stalled_rank_does_not_hang_the_others(small_demo, tmp_path):
    timeout_s = 10
    args = ["train", f"hydra.run.dir={tmp_path}", *ARGS, *IN_PROCESS_DATA, "train.steps=100000"]
    args.append(f"parallel.timeout_s={timeout_s}")  # (the data in-process: the stalled rank is the subject)
    procs = srun_tasks(2, args, stopped_from_outside=True)
    try:
        wait_for_step(tmp_path, 3, procs)
        procs[1].send_signal(signal.SIGSTOP)  # alive but stuck: only a collective timeout can notice
        rc0 = procs[0].wait(timeout=600)  # (only a hang gets here: the collective's own timeout is 10 s)
    finally:
        procs[1].kill()
    err0 = procs[0].communicate()[1]
    assert rc0 != 0
    assert "parallel.timeout_s=10" in err0, err0[-2000:]
