"""EMA weights (``train.ema_decay``) through the real CLI: the average a run checkpoints equals the recurrence
computed here from the run's own weights at every step; every engine keeps the same average as one process
(sharded like its parameters) and resumes it bit for bit; the end-of-run eval reports raw and EMA results, and
``clipkit eval`` / ``clipkit export weights=ema`` read the EMA weights back (the export loaded by open_clip).

Same data and tolerance as test_engines.py (global batches of 48 of 96 pairs, float32, ATOL 1e-5)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from clipkit.config import saved_config
from clipkit.model import build
from clipkit.model_config import ModelConfig
from tests.conftest import run_cli
from tests.integration.test_engines import ATOL, COMMON, STEPS, torchrun
from tests.unit.test_ema import _reference

DECAY = 0.9
EMA = [f"train.ema_decay={DECAY}"]
# Evals at steps 3, 6, 9 and at the end: mid-run (ZeRO-3's small persistent parameters gathered) and right after
# a checkpoint save (partitioned).
EVAL = ["eval.zeroshot.dataset=demo", "eval.every=3"]
# `make test-all` runs every engine (~30 s to 1 min each). make test keeps within its 30 minutes without them: the
# fast kill -9 trial trains and resumes with EMA under DDP, and tests/unit/test_ema.py checks the average itself.
ENGINES = [
    pytest.param("fsdp", marks=pytest.mark.slow),
    pytest.param("ddp", marks=pytest.mark.slow),
    pytest.param("zero1", marks=pytest.mark.slow),
    pytest.param("zero2", marks=pytest.mark.slow),
    pytest.param("zero3", marks=pytest.mark.slow),
]


def _step(run, step: int = STEPS):
    return run / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("ema") / "single"
    run_cli(
        "train",
        f"hydra.run.dir={run}",
        *COMMON,
        *EMA,
        "train.checkpoint_every=1",
        f"train.keep_last={STEPS}",
        *EVAL,
        check=True,
    )
    return run


def test_the_checkpointed_average_is_the_recurrence_over_the_runs_weights(single):
    cfg = saved_config(single)
    torch.manual_seed(cfg.train.seed)  # the run's initial weights: its model config, built from its seed
    history = [build(cfg.model).model.state_dict()]
    history += [load_file(str(_step(single, s) / "model.safetensors")) for s in range(1, STEPS + 1)]
    ema = load_file(str(_step(single) / "ema.safetensors"))
    params = dict(build(ModelConfig()).model.named_parameters())
    assert ema.keys() == params.keys()  # every parameter trains here; no buffer is averaged
    ref = _reference([{k: h[k] for k in ema} for h in history], DECAY, warmup=True)
    for name, value in ema.items():
        assert value.dtype == torch.float32 and value.shape == params[name].shape, name
        torch.testing.assert_close(value.double(), ref[name], atol=1e-6, rtol=0, msg=name)
    assert json.loads((_step(single) / "ema.json").read_text())["updates"] == STEPS
    moved = [k for k in ema if not torch.equal(ema[k], history[-1][k])]
    assert len(moved) == len(ema)  # (the average is not the last weights)


def test_eval_reports_both_and_clipkit_eval_reads_the_ema_back(single, tmp_path):
    summary = json.loads((single / "summary.json").read_text())
    assert {"zeroshot", "zeroshot_ema"} <= set(summary["eval"])
    out = tmp_path / "eval.json"
    run_cli(
        "eval", f"checkpoint={single}", "eval.use_ema=ema", "eval.retrieval.dataset=", f"eval.output={out}", check=True
    )
    got = json.loads(out.read_text())["eval"]
    assert set(got) == {"zeroshot_ema"}
    # the training-time swap and a fresh load of ema.safetensors evaluate the same weights
    assert got["zeroshot_ema"]["acc1"] == summary["eval"]["zeroshot_ema"]["acc1"]
    assert got["zeroshot_ema"]["acc5"] == summary["eval"]["zeroshot_ema"]["acc5"]


def test_export_of_the_ema_weights_loads_in_open_clip(single, tmp_path):
    import open_clip

    out = tmp_path / "export"
    proc = run_cli("export", f"checkpoint={single}", "weights=ema", f"out={out}", check=True)
    assert "(ema weights)" in proc.stdout
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    ema = load_file(str(_step(single) / "ema.safetensors"))
    exported = model.state_dict()
    for name, value in ema.items():
        assert torch.equal(exported[name], value), name


def test_asking_for_ema_weights_a_run_does_not_have_is_a_named_error(single, tmp_path):
    plain = tmp_path / "plain"
    run_cli("train", f"hydra.run.dir={plain}", *COMMON, "train.steps=2", check=True)
    proc = run_cli("export", f"checkpoint={plain}", "weights=ema", f"out={tmp_path / 'x'}")
    assert proc.returncode == 2 and "weights='ema'" in proc.stderr and "train.ema_decay=0" in proc.stderr
    proc = run_cli("eval", f"checkpoint={plain}", "eval.use_ema=ema")
    assert proc.returncode == 2 and "eval.use_ema='ema'" in proc.stderr
    proc = run_cli("train", f"hydra.run.dir={tmp_path / 'y'}", "eval.use_ema=ema")
    assert proc.returncode == 2 and "eval.use_ema='ema'" in proc.stderr and "train.ema_decay" in proc.stderr
    assert not (tmp_path / "y").exists() or not (tmp_path / "y" / "checkpoints").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_keeps_the_same_average_and_resumes_it_exactly(single, tmp_path, engine):
    run = tmp_path / engine
    torchrun(run, f"parallel={engine}", *EMA, *EVAL)
    got, ref = load_file(str(_step(run) / "ema.safetensors")), load_file(str(_step(single) / "ema.safetensors"))
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name  # open_clip's shapes (the temperature 0-d)
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)

    # Every eval of the EMA weights (swapped into this engine's shards / partitions) predicts what one process's
    # does, image by image; the raw weights predict otherwise (so the comparison can tell them apart).
    def confusions(r) -> list:
        return [
            (e["step"], [e["eval"][k][m] for m in ("acc1", "acc5", "per_class_recall")])
            for e in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
            if "eval" in e
            for k in ("zeroshot", "zeroshot_ema")
        ]

    got_evals, ref_evals = confusions(run), confusions(single)
    assert [s for s, _ in ref_evals] == [3, 3, 6, 6, 9, 9, 10, 10]
    assert ref_evals[-2][1] != ref_evals[-1][1]  # raw != EMA at the end
    assert got_evals == ref_evals
    final = {
        r: json.loads((r / "summary.json").read_text())["eval"]["zeroshot_ema"]["confusion"] for r in (run, single)
    }
    assert final[run] == final[single]

    # Resume from step 5 (the step-10 checkpoint removed): the same average, bit for bit.
    resumed = tmp_path / f"{engine}_resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(_step(resumed))
    proc = torchrun(resumed, f"parallel={engine}", *EMA)
    assert "resumed from" in proc.stderr and "(step 5," in proc.stderr
    again = load_file(str(_step(resumed) / "ema.safetensors"))
    for name in got:
        assert torch.equal(again[name], got[name]), name
    assert json.loads((_step(resumed) / "ema.json").read_text()) == json.loads((_step(run) / "ema.json").read_text())
