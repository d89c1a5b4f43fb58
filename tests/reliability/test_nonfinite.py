"""Case 5: non-finite loss or gradient. A non-finite step is never applied (decided on the device, no host read);
``train.nonfinite=fail`` stops at the next read of the steps (every step here: ``train.log_every=1``) naming step
and rank; ``skip`` makes every rank skip the same step with parameters unchanged (the step counts; its batch is
not retried) and aborts after N in a row; the loss-spike detector raises no alarm on a clean run and fires on a
real spike."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import IN_PROCESS_DATA, srun_tasks
from tests.reliability.harness import RUN_ARGS, record
from tests.reliability.harness import train_in_process as train  # (the loader is not this case's subject)

pytestmark = pytest.mark.reliability


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fail_policy_stops_before_the_update(small_demo, tmp_path):
    checks = []
    for fault, what in (("nan_loss@6", "non-finite loss"), ("inf_grad@6", "non-finite gradient")):
        run = tmp_path / fault.split("@")[0]
        proc = train(run, "train.nonfinite=fail", faults=fault)
        last = max(r["step"] for r in records(run) if "loss" in r)
        checks.append(
            proc.returncode == 1
            and what in proc.stderr
            and "step 6" in proc.stderr
            and "rank 0" in proc.stderr
            and last == 5
            and "Traceback" not in proc.stderr
        )
    figure = "exit 1 at the next read of the steps (every step here), naming step and rank; nothing applied"
    record("non-finite, policy fail", len(checks), sum(checks), figure)
    assert all(checks)


def test_skip_policy_two_ranks_agree(small_demo, tmp_path):
    """NaN on rank 1 only: both ranks skip that step (the run would hang or diverge otherwise)."""
    args = ["train", f"hydra.run.dir={tmp_path}", *RUN_ARGS, *IN_PROCESS_DATA, "train.nonfinite=skip"]
    args.append("parallel.timeout_s=60")
    procs = srun_tasks(2, args, extra_env={"CLIPKIT_FAULTS": "nan_loss@6/1"})
    results = [(p.wait(300), p.communicate()[1]) for p in procs]
    ok = all(rc == 0 for rc, _ in results)
    recs = records(tmp_path)
    skipped = [r for r in recs if r.get("skipped")]
    trainer = json.loads(sorted((tmp_path / "checkpoints").glob("step_*"))[-1].joinpath("trainer.json").read_text())
    delivered = {d["samples_delivered"] for d in trainer["data"]}
    ok = ok and len(skipped) == 1 and skipped[0]["step"] == 6 and len(delivered) == 1
    ok = ok and max(r["step"] for r in recs if "loss" in r) == 12  # 12 steps, of which 11 updates
    ok = ok and sum(r.get("skipped_steps", 0) for r in recs) == 1
    record("non-finite, policy skip (2 ranks)", 1, int(ok), "both ranks skipped step 6 together; 11 of 12 applied")
    assert ok, (results[0][1][-1500:], skipped, delivered)


def test_skip_leaves_parameters_unchanged_and_aborts_after_n():
    from clipkit import model as model_lib
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.engine import build_engine
    from clipkit.faults import _InfGrad
    from clipkit.loss import build_loss
    from clipkit.step import train_step

    cfg = RootConfig()
    built = model_lib.build(cfg.model)
    engine = build_engine(built.model, cfg, DistEnv())
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    loss_fn = build_loss("infonce", "gathered", "auto")
    size, ctx = built.image_size, built.context_length
    images, text = torch.randn(8, 3, size, size), torch.randint(1, 100, (8, ctx))
    nan_loss = lambda *a: loss_fn(*a) * float("nan")  # noqa: E731
    inf_grad = lambda *a: _InfGrad.apply(loss_fn(*a))  # noqa: E731
    raised = sum(not bool(train_step(engine, fn, [(images, text)]).applied) for fn in (nan_loss, inf_grad))
    unchanged = all(torch.equal(before[k], v) for k, v in built.model.state_dict().items())
    # (the fused kernel creates the moments before it learns the step is skipped: zeros, at step 0)
    state = engine.optimizer.state_dict()["state"].values()
    untouched = all(not v.any() for st in state for v in st.values())
    ok = unchanged and raised == 2 and untouched and engine.scheduler.last_epoch == 2  # (a skipped step is a step)
    record("non-finite skip leaves state unchanged", 2, 2 * ok, "NaN loss, inf gradient: params + optimizer bit-equal")
    assert ok, (raised, unchanged, untouched, engine.scheduler.last_epoch)

    run_abort = train_abort_after_n()
    assert run_abort


def train_abort_after_n() -> bool:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        proc = train(Path(tmp), "train.nonfinite=skip", "train.max_nonfinite_skips=3", faults="nan_loss@5+")
        ok = proc.returncode == 1 and "4 non-finite steps in a row" in proc.stderr
    record("non-finite skips in a row abort", 1, int(ok), "stopped after 3 skipped steps, with the reason")
    return ok


def test_spike_detector(small_demo, tmp_path):
    clean = train(tmp_path / "clean", "train.steps=30")
    alarms_clean = [r for r in records(tmp_path / "clean") if r.get("loss_spike")]
    spiked = train(tmp_path / "spiked", "train.steps=30", faults="spike_loss@25")
    alarms = [r["step"] for r in records(tmp_path / "spiked") if r.get("loss_spike")]
    checks = [clean.returncode == 0 and not alarms_clean, spiked.returncode == 0 and alarms == [25]]
    record(
        "loss-spike detector", 2, sum(checks), f"clean run: {len(alarms_clean)} alarms; injected x20 spike: {alarms}"
    )
    assert all(checks), (alarms_clean, alarms)


def test_signal_during_a_run_of_skipped_steps_is_honoured(small_demo, tmp_path):
    """SIGTERM while steps are being skipped (non-finite, train.nonfinite=skip, every step from step 5 on): the
    preemption check still runs after each step, so the run stops with a checkpoint at once instead of after the
    skips."""
    run = tmp_path / "skips"
    faults = "nan_loss@5+;sigterm:skip@5"
    proc = train(run, "train.nonfinite=skip", "train.max_nonfinite_skips=50", faults=faults)
    skipped = [r for r in records(run) if "skipped" in r]
    ok = proc.returncode == 0 and "SIGTERM: stopped after step 5" in proc.stderr and len(skipped) == 1
    record("signal during skipped steps", 1, int(ok), f"stopped after {len(skipped)} skip(s), exit {proc.returncode}")
    assert ok, proc.stderr[-2000:]
