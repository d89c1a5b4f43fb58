"""Case 7: SIGTERM / SIGUSR1 during training, a periodic eval and a checkpoint save: a complete checkpoint, a
clean exit, and an exact resume."""

from __future__ import annotations

import pytest

from tests.reliability.harness import long_only, record, same_run, srun_train, train, train_in_process

pytestmark = pytest.mark.reliability

CASES = {  # fault -> the step the stop checkpoint must be
    "sigterm:step@6": 6,  # during training (between updates)
    "sigterm:eval@8": 8,  # during a periodic eval (eval.every=4): the eval finishes, then the stop
    "sigterm:save_written@8": 8,  # in the middle of a checkpoint write: the write completes, then the stop
    "sigusr1:step@5": 5,  # SLURM's pre-timeout warning (requeue is skipped outside SLURM)
}


def test_signals_checkpoint_and_resume_exactly(plain_ref, tmp_path):
    ref = plain_ref
    passed, fails = 0, []
    for fault, stop_step in CASES.items():
        run = tmp_path / fault.replace(":", "_").replace("@", "_")
        extra = ["eval.every=4", "eval.zeroshot.dataset=demo"] if ":eval" in fault else []
        # The first case stops a run whose loader workers are running; the others read the data in the training
        # process (the signal and the save are their subject; the sample order is the same either way).
        run_train = train if fault == "sigterm:step@6" else train_in_process
        stopped = run_train(run, *extra, faults=fault)
        signame = fault.split(":")[0].upper()
        saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        ok = stopped.returncode == 0 and f"{signame}: stopped after step {stop_step}" in stopped.stderr
        ok = ok and saved[-1] == f"step_{stop_step:08d}"
        resumed = run_train(run)
        same, why = same_run(run, ref) if resumed.returncode == 0 else (False, resumed.stderr[-500:])
        passed += ok and same
        if not (ok and same):
            fails.append(f"{fault}: stop ok={ok} ({saved}); {why}; {stopped.stderr[-800:]}")
    record("signals during train / eval / save", len(CASES), passed, "complete checkpoint, exit 0, identical resume")
    assert not fails, fails


@long_only  # (make test: SIGTERM to one rank of two in test_preemption, the signal cases above in one process)
def test_sigterm_on_one_fsdp_rank_during_a_save(fsdp_ref, tmp_path):
    """parallel=fsdp, 2 ranks, default parallel.signal_check_every=10: SIGTERM reaches rank 1 alone in the
    middle of the step-8 torch-DCP save (its shards written, rank 0's manifest not yet); the save completes,
    both ranks agree to stop at the next check (step 10), save step 10 and exit 0; the resume ends
    bit-identical to an uninterrupted FSDP run."""
    ref, run = fsdp_ref, tmp_path / "run"
    stopped = srun_train(run, "parallel=fsdp", faults="sigterm:save_shards@8/1")
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    ok = all(rc == 0 for rc, _ in stopped) and "SIGTERM: stopped after step 10" in stopped[0][1]
    ok = ok and saved[-2:] == ["step_00000008", "step_00000010"]
    resumed = srun_train(run, "parallel=fsdp")
    same, why = same_run(run, ref) if all(rc == 0 for rc, _ in resumed) else (False, resumed[0][1][-800:])
    record("SIGTERM on one FSDP rank during a save (2 ranks)", 1, int(ok and same), f"stop at step 10; {why}")
    assert ok and same, (saved, why, stopped[0][1][-1500:])
