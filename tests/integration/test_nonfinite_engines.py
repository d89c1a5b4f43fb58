"""Every engine obeys ``train.nonfinite`` identically (issue 14, defect 1).

DeepSpeed ZeRO skips an update whose gradient norm is not finite by itself (parameters and optimizer state
untouched) and never raises. Each engine reports the skipped update as a device flag, the schedule is
clipkit's own on every engine (it advances every step, skipped or not), and the loop applies the policy when
it reads the flags: checked here per engine (a NaN loss and an infinite gradient, one process each) and through
the CLI on 2 ranks under ZeRO-2 (skip: the learning rate of every step is the one of a run without the fault)
and ZeRO-1 (fail: exit 1 at the next read, naming step and rank, the bad update never applied).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipkit.optim import lr_factor
from tests.conftest import IN_PROCESS_DATA, SMALL_DEMO, srun_tasks

ENGINE_CHECK = r"""
import json, sys, torch
from clipkit import model as model_lib
from clipkit.config import RootConfig
from clipkit.distributed import DistEnv
from clipkit.engine import build_engine
from clipkit.faults import _InfGrad
from clipkit.loss import build_loss
from clipkit.step import train_step

out = {}
for name in sys.argv[1:]:
    cfg = RootConfig()
    cfg.train.precision, cfg.train.global_batch_size, cfg.parallel.engine = "fp32", 8, name
    torch.manual_seed(0)
    built = model_lib.build(cfg.model)
    engine = build_engine(built.model, cfg, DistEnv())
    loss_fn = build_loss("infonce", "gathered", "auto")
    size, ctx = built.image_size, built.context_length
    batch = [(torch.randn(8, 3, size, size), torch.randint(1, 100, (8, ctx)))]
    first = train_step(engine, loss_fn, batch)  # a good step first, so that optimizer state exists
    def snapshot():
        with engine.full_params():
            return {k: v.clone() for k, v in built.model.state_dict().items()}, engine.lr
    before, lr_before = snapshot()
    faulty = [lambda *a: loss_fn(*a) * float("nan"), lambda *a: _InfGrad.apply(loss_fn(*a))]
    skipped = [not bool(train_step(engine, fn, batch).applied) for fn in faulty]
    after, lr_after = snapshot()
    good = train_step(engine, loss_fn, batch)
    changed, _ = snapshot()
    out[name] = {
        "first_applied": bool(first.applied),
        "skipped": skipped,
        "unchanged": all(torch.equal(before[k], v) for k, v in after.items()),
        # a skipped step is a step: after one good and two skipped steps the next is the 4th step's learning rate
        "schedule_counts_steps": lr_after == cfg.optim.lr * min(1.0, 4 / cfg.optim.warmup_steps),
        "next_applied": bool(good.applied) and not all(torch.equal(after[k], v) for k, v in changed.items()),
        "lr_after_four_steps": engine.lr == cfg.optim.lr * min(1.0, 5 / cfg.optim.warmup_steps),
    }
print(json.dumps(out))
"""


def test_each_engine_skips_a_non_finite_update_and_reports_it():
    engines = ["ddp", "zero1", "zero2", "zero3"]  # ddp at world size 1 is the local engine
    proc = subprocess.run([sys.executable, "-c", ENGINE_CHECK, *engines], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in engines:
        r = results[name]
        assert r == {
            "first_applied": True,
            "skipped": [True, True],
            "unchanged": True,
            "schedule_counts_steps": True,
            "next_applied": True,
            "lr_after_four_steps": True,
        }, (name, r)


ARGS = [
    *SMALL_DEMO,
    *IN_PROCESS_DATA,
    "train.steps=8",
    "train.global_batch_size=32",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.precision=fp32",
    "optim.lr=1e-3",  # (named: the expected learning rates below are computed from it, not from the demo's)
    "optim.warmup_steps=4",
    "optim.schedule=cosine",  # (not the demo's wsd: the lr differs at every update, so a drift would show)
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
    "parallel.timeout_s=120",
]


def _run(tmp_path, engine: str, policy: str, fault: str):
    args = ["train", f"hydra.run.dir={tmp_path}", *ARGS, f"parallel={engine}", f"train.nonfinite={policy}"]
    procs = srun_tasks(2, args, extra_env={"CLIPKIT_FAULTS": fault, "OMP_NUM_THREADS": "1"})
    results = [(p.wait(600), p.communicate()[1]) for p in procs]
    path = tmp_path / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return results, records


@pytest.mark.parametrize(
    ("engine", "policy"),
    [("zero2", "skip"), ("zero1", "fail")],
    ids=["zero2-skip", "zero1-fail"],
)
def test_zero_obeys_the_nonfinite_policy_through_the_cli(small_demo, tmp_path, engine, policy):
    # Rank 1's loss of step 4 is finite, its gradient infinite: DeepSpeed's norm is inf on every rank. (A NaN
    # loss was caught before this fix too, by a check of the loss before backward.)
    results, records = _run(tmp_path, engine, policy, "inf_grad@4/1")
    errors = "".join(err[-2000:] for _, err in results)
    updates = [r for r in records if "loss" in r]
    if policy == "fail":
        assert [rc for rc, _ in results] == [1, 1], errors
        assert "non-finite gradient (norm inf) at step 4 on rank 0" in results[0][1], errors
        assert "no update was applied" in results[0][1], errors
        assert [r["step"] for r in updates] == [1, 2, 3], errors
        return
    assert [rc for rc, _ in results] == [0, 0], errors
    assert [r["step"] for r in records if r.get("skipped")] == [4], records
    assert "non-finite gradient (norm inf) at step 4" in next(r["skipped"] for r in records if r.get("skipped"))
    # 8 steps (7 updates applied), each with the learning rate of its own step number, on every engine alike.
    cfg_lr, warmup, steps = 1e-3, 4, 8
    from clipkit.optim_config import OptimConfig

    optim = OptimConfig(lr=cfg_lr, warmup_steps=warmup)
    expected = [cfg_lr * lr_factor(step - 1, optim, steps) for step in range(1, steps + 1)]
    assert [r["step"] for r in updates] == list(range(1, steps + 1))
    assert [r["lr"] for r in updates] == pytest.approx(expected, rel=1e-9), [r["lr"] for r in updates]
