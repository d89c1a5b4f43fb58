"""Cases 1-2: kill -9 of a random rank at a random step, and kills at every point of a checkpoint write."""

from __future__ import annotations

import shutil

import pytest

from tests.reliability.harness import (
    STEPS,
    long_only,
    record,
    rng,
    same_run,
    srun_train,
    train,
    train_in_process,
    trials,
)

pytestmark = pytest.mark.reliability


def kill9_trials(tmp_path, ref, case: str, n: int, *overrides: str, label: str = "plain") -> None:
    """n trials: kill -9 a random rank at a random step of a 2-rank run, resume, compare with ``ref`` (an
    uninterrupted run of the same engine) bit for bit."""
    passed, fails, r = 0, [], rng(case)
    for t in range(n):
        rank, step = r.randrange(2), r.randrange(2, STEPS)
        run = tmp_path / f"{case}_trial{t}"
        killed = srun_train(run, *overrides, faults=f"kill:step@{step}/{rank}")
        assert killed[rank][0] == -9, f"trial {t}: rank {rank} was not killed ({killed[rank]})"
        resumed = srun_train(run, *overrides)
        ok, why = (
            (False, f"resume failed: {resumed[0][1][-500:]}") if any(rc for rc, _ in resumed) else same_run(run, ref)
        )
        passed += ok
        if not ok:
            fails.append(f"trial {t} (rank {rank}, step {step}): {why}")
        shutil.rmtree(run)
    engine = next((o.split("=")[1] for o in overrides if o.startswith("parallel=")), "ddp")
    figure = "bit-identical params, optimizer, losses; 0 keys lost/repeated"
    recipe = "" if label == "plain" else f", {label}"
    record(f"kill -9 a random rank (2 ranks, {engine}{recipe})", n, passed, figure)
    assert not fails, fails


# The kill matrix's training recipes (DDP): name -> (overrides, trials). Fast mode runs one DDP trial with every
# recipe on (a locked image tower whose last group trains: frozen parameters, optimizer state for the rest; EMA
# weights of what trains; a teacher to distil from; a CoCa student with its caption decoder; an ITM head with its
# seeded hard negatives); long mode each recipe alone as well, and LoRA (not combinable with CoCa).
LIT = ["model.lock_image=true", "model.lock_image_unlocked_groups=1"]
EMA = ["train.ema_decay=0.9"]
DISTILL = ["distill.teacher={teacher}"]
COCA = ["model=coca_tiny"]
ITM = ["loss.itm_weight=1"]
RECIPES = {
    "plain": ([], trials(0, 10)),
    "lit": (LIT, trials(0, 3)),
    "ema": (EMA, trials(0, 3)),
    "distill": (DISTILL, trials(0, 3)),
    "coca": (COCA, trials(0, 3)),
    "itm": (ITM, trials(0, 3)),
    "lit+ema+distill+coca+itm": ([*LIT, *EMA, *DISTILL, *COCA, *ITM], trials(1, 3)),
    # LoRA adapters on the teacher run's weights: checkpoints without the frozen weights, which come back from it
    "lora": (["model=small", "model.init_from={teacher}", "model.lora.rank=4"], trials(0, 3)),
}


@pytest.fixture(scope="session")
def teacher(small_demo, tmp_path_factory):
    """A teacher run to distil from: clipkit-small, a few steps."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert train(run, "model=small", "train.steps=2").returncode == 0, "teacher run failed"
    return run


@pytest.mark.parametrize("recipe", RECIPES)
def test_kill9_random_rank_random_step(small_demo, tmp_path, recipe, request):
    overrides, n = RECIPES[recipe]
    if n == 0:
        pytest.skip("CLIPKIT_RELIABILITY=long runs it; fast mode's DDP trial runs with every recipe on")
    if any("{teacher}" in o for o in overrides):
        overrides = [o.format(teacher=request.getfixturevalue("teacher")) for o in overrides]
    ref = tmp_path / "ref"
    assert all(rc == 0 for rc, _ in srun_train(ref, *overrides)), "reference run failed"
    kill9_trials(tmp_path, ref, f"kill9_{recipe}", n, *overrides, label=recipe)


def test_kill9_random_rank_random_step_fsdp(fsdp_ref, tmp_path):
    """The same under FSDP2 with synchronous torch-DCP checkpoints (each rank writes its own shards)."""
    kill9_trials(tmp_path, fsdp_ref, "kill9_fsdp", trials(1, 5), "parallel=fsdp")


POINTS = {  # where the step-8 save is killed -> the checkpoint a resume must start from
    "save_start": 4,
    "save_written": 4,
    "save_manifest": 4,
    "save_done": 8,
}


def test_kill_during_save(plain_ref, tmp_path):
    """The save is the subject, so the data is read in the training process (the reference run has workers: the
    sample order is the same either way); kill -9 with loader workers alive is the random-step trials' case."""
    ref = plain_ref
    passed, figures, fails = 0, [], []
    for point, expected_from in POINTS.items():
        run = tmp_path / point
        killed = train_in_process(run, faults=f"kill:{point}@8")
        assert killed.returncode == -9, (point, killed.stderr[-500:])
        resumed = train_in_process(run)
        started = f"resumed from {run}/checkpoints/step_{expected_from:08d}"
        ok, why = same_run(run, ref) if resumed.returncode == 0 else (False, resumed.stderr[-500:])
        ok = ok and started in resumed.stderr
        passed += ok
        figures.append(f"{point}: step {expected_from}")
        if not ok:
            fails.append(f"{point}: {why}; {started!r} in stderr: {started in resumed.stderr}")
    record("kill during checkpoint save", len(POINTS), passed, "resumed from newest complete: " + ", ".join(figures))
    assert not fails, fails


@long_only  # (make test keeps FSDP's random kill -9 trial; async saves: here and in test_engines)
def test_kill9_during_an_async_fsdp_save(fsdp_ref, tmp_path):
    """parallel=fsdp with train.async_checkpoint=true: rank 0 is killed while the step-8 save is written in the
    background (its files written, no manifest yet); the resume starts from step 4 and ends bit-identical to an
    uninterrupted (synchronous) FSDP run (parameters, schedule, losses, sample keys)."""
    fsdp = ("parallel=fsdp", "train.async_checkpoint=true")
    run, ref = tmp_path / "run", fsdp_ref
    killed = srun_train(run, *fsdp, faults="kill:save_written@8/0")
    resumed = srun_train(run, *fsdp)
    from_step4 = "resumed from" in resumed[0][1] and "(step 4," in resumed[0][1]
    same, why = same_run(run, ref) if all(rc == 0 for rc, _ in resumed) else (False, resumed[0][1][-800:])
    ok = killed[0][0] == -9 and from_step4 and same
    record("kill -9 during an async FSDP save (2 ranks)", 1, int(ok), f"resumed from step 4: {from_step4}; {why}")
    assert ok, (killed[0][0], from_step4, why)
