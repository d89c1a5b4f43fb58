"""The SLURM path: tasks started by a fake `srun` (local processes with only SLURM's variables) form one job."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import IN_PROCESS_DATA, SMALL_DEMO, srun_tasks


def fake_srun(ntasks: int, args: list[str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """What `srun --ntasks=N python -m clipkit ...` does on one node: N tasks, SLURM variables, no torchrun ones."""
    procs = srun_tasks(ntasks, args)
    return [subprocess.CompletedProcess(p.args, p.wait(timeout), *p.communicate()) for p in procs]


def test_srun_tasks_form_a_two_rank_job(small_demo, tmp_path):
    args = [
        "train",
        f"hydra.run.dir={tmp_path}",
        *SMALL_DEMO,
        *IN_PROCESS_DATA,
        "train.steps=6",
        "train.checkpoint_every=6",
        "train.log_every=3",
        "optim.warmup_steps=2",
        "logging.progress=false",
        "logging.report=false",
        "eval.zeroshot.dataset=",
        "eval.retrieval.dataset=",
    ]
    results = fake_srun(2, args)
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "world size 2" in results[0].stderr
    trainer = json.loads((tmp_path / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and len(trainer["data"]) == 2


def test_srun_world_size_enters_validation(tmp_path):
    """A batch that does not divide over the SLURM tasks is refused by every task before anything starts."""
    results = fake_srun(2, ["train", f"hydra.run.dir={tmp_path}", "train.global_batch_size=127"], timeout=600)
    assert all(r.returncode == 2 and "train.global_batch_size=127" in r.stderr for r in results)
