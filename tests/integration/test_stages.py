"""``train.stages`` through the real CLI: a run of 3 steps at 16 px with half the patches dropped, then 3 at 32 px.
It trains on the samples of the same run without stages; a run resumed from its checkpoint inside the first
stage, at the switch or inside the second ends with its weights bit for bit; DDP (and in ``make test-all``
FSDP) on 2 ranks equal one process, EMA weights included.

Same data as test_engines.py (global batches of 48 of 96 pairs, float32, no workers)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from clipkit.stages import resize_grid
from tests.conftest import run_cli
from tests.integration.test_engines import ATOL, COMMON, keys_per_step, losses, torchrun

STEPS = 6
SHORT = [*COMMON, f"train.steps={STEPS}"]
STAGED = ["train.stages=[3:16:0.5,rest:32]", "train.checkpoint_every=1", f"train.keep_last={STEPS}"]


def _weights(run, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("stages") / "staged"
    proc = run_cli("train", f"hydra.run.dir={run}", *SHORT, *STAGED, check=True)
    return run, proc


def test_a_staged_run_switches_once_and_trains_on_the_unstaged_runs_samples(staged, tmp_path):
    run, proc = staged
    assert "stage 1 of 2: steps 1-3 at 16 px, patch dropout 0.5" in proc.stderr
    assert "stage 2 of 2: steps 4-6 at 32 px" in proc.stderr
    plain = tmp_path / "plain"
    run_cli("train", f"hydra.run.dir={plain}", *SHORT, check=True)
    assert keys_per_step(run) == keys_per_step(plain)
    staged_losses, plain_losses = losses(run), losses(plain)
    assert staged_losses[0] != plain_losses[0]  # (the first step already saw 16 px images: another loss)
    # The checkpoint at the switch holds stage 1's embedding carried over: its 4 x 4 grid is a 2 x 2 grid's
    # upsampled (a least-squares fit through the upsampling leaves nothing), which step 2's was not.
    assert _off_a_2x2_grid(_weights(run, 3)["visual.positional_embedding"]) < 1e-5
    assert _off_a_2x2_grid(_weights(run, 2)["visual.positional_embedding"]) > 0.1


def _off_a_2x2_grid(pos: torch.Tensor) -> float:
    """How far the 4 x 4 grid part of ``pos`` is from any 2 x 2 grid upsampled (relative least-squares residual)."""
    basis = torch.cat([torch.zeros(1, 4), torch.eye(4)]).double()  # each 2 x 2 cell alone, as a 4-wide embedding
    up = resize_grid(basis, 2, 4)[1:]  # (16, 4): the upsampling as a matrix
    cells = pos[1:].double()
    fit = up @ torch.linalg.lstsq(up, cells).solution
    return float((cells - fit).norm() / cells.norm())


@pytest.mark.parametrize(
    "resume_at",
    [
        pytest.param(2, id="inside-stage-1"),
        pytest.param(3, id="at-the-switch"),
        pytest.param(5, id="inside-stage-2"),
    ],
)
def test_a_resumed_staged_run_ends_with_the_same_weights(staged, tmp_path, resume_at):
    run, _ = staged
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    for later in range(resume_at + 1, STEPS + 1):
        shutil.rmtree(copy / "checkpoints" / f"step_{later:08d}")
    proc = run_cli("train", f"hydra.run.dir={copy}", *SHORT, *STAGED, check=True)
    assert f"resumed from {copy / 'checkpoints' / f'step_{resume_at:08d}'}" in proc.stderr
    final, reference = _weights(copy), _weights(run)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference), [
        k for k in reference if not torch.equal(final[k], reference[k])
    ]
    assert keys_per_step(copy) == keys_per_step(run)


@pytest.mark.parametrize("engine", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_ranks_train_a_staged_run_as_one_process(tmp_path, engine):
    # (without patch dropout: its random patches are drawn per rank, so they depend on the layout; with EMA
    # weights, which the switch rewrites too: whole on DDP, as shards on FSDP)
    stages = ["train.stages=[3:16,rest:32]", "train.ema_decay=0.9", "train.checkpoint_every=3"]
    single, ranks = tmp_path / "single", tmp_path / engine
    run_cli("train", f"hydra.run.dir={single}", *SHORT, *stages, check=True)
    torchrun(ranks, f"parallel={engine}", f"train.steps={STEPS}", *stages)
    assert keys_per_step(ranks) == keys_per_step(single)
    torch.testing.assert_close(losses(ranks), losses(single), rtol=0, atol=ATOL)
    for step in (3, STEPS):  # (at the switch, and at the end)
        for file in ("model.safetensors", "ema.safetensors"):
            final = load_file(str(ranks / "checkpoints" / f"step_{step:08d}" / file))
            reference = load_file(str(single / "checkpoints" / f"step_{step:08d}" / file))
            assert final.keys() == reference.keys()
            for name, value in reference.items():
                torch.testing.assert_close(final[name], value, rtol=0, atol=ATOL, msg=f"{file} {name}")
