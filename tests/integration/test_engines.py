"""Engines and layouts through the real CLI: one process (with 1 and 3 loader workers), DDP (2 and 4 ranks,
one node and two loopback "nodes"), DeepSpeed ZeRO-1/2/3 and FSDP2 (2 ranks) train the same 10 steps of the
same global batches to the same parameters, with the same gradient norm at every step, and (issue 30) on the
same sample keys at every step (``train.record_keys``): the order of samples is a function of the seed, the data,
the global batch and data.streams, never of the world size or the loader workers. A run stopped and resumed
through four layouts ends where the uninterrupted single process does.

96 training pairs and a global batch of 48 (data.streams=0 picks 48 streams, 1 sample each per step): every
epoch is 2 steps, so the 10 steps cross 5 epochs and every stream rolls over. (A run's cost here is mostly per
step, not per sample: the batch was 192 of 384 pairs until these runs were timed.) What differs between layouts is
the order of floating-point sums (the batch's row order, the all-reduce), so parameters agree to float32
tolerance, not bit for bit: the test allows ATOL = 1e-5 on the parameters and 1e-5 relative on the losses.
Two loopback nodes and one node with the same world size compute the same thing in the same
order: bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import prefork
from tests.conftest import run_cli
from tests.ports import free_port

ATOL = 1e-5
STEPS = 10
# Gradient caching: 2 micro-batches of 12 per rank make a global batch of 48 on 2 ranks.
MICRO2 = "train.micro_batch_size=12"
COMMON = [
    "data.demo.num_train=96",
    "data.demo.shard_size=32",
    "data.demo.num_zeroshot=36",
    "data.demo.num_retrieval=10",
    "data.num_workers=0",  # (the runs named workers3 and the resume chain's layouts read with workers)
    f"train.steps={STEPS}",
    "train.global_batch_size=48",
    "train.record_keys=true",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.precision=fp32",
    "optim.warmup_steps=2",
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=",
    "eval.retrieval.dataset=",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def torchrun(run_dir: Path, *overrides: str, nproc: int = 2, faults: str = "") -> subprocess.CompletedProcess:
    """torchrun's agent starting ``nproc`` ranks of ``clipkit train``. The agent (``python -m
    torch.distributed.run``) and each rank (the tests' ``clipkit`` shim) are forked from the tests' fork server
    (``tests/prefork.py``), which has the libraries imported (~2 s of the agent's CPU, ~4 s of each rank's); the
    launcher scripts' tests (``launch/``) and CLIPKIT_TEST_PREFORK=0 start real interpreters."""
    server = prefork.client()
    program = ["--no-python", str(server.shim() / "clipkit")] if server else ["-m", "clipkit"]
    args = [f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *program, "train"]
    args += [f"hydra.run.dir={run_dir}", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIPKIT_FAULTS": faults, "PYTHONUNBUFFERED": "1"}
    if server is not None:
        proc = server.start(args, env, module="torch.distributed.run").wait(600)
    else:
        proc = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def assert_same_training(run: Path, ref: Path) -> None:
    """``run`` logged ``ref``'s losses (rel. 1e-5) and ended with its weights (ATOL), the same names."""
    assert losses(run) == pytest.approx(losses(ref), rel=1e-5, abs=0)
    got, want = final_weights(run), final_weights(ref)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)


def logged(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def losses(run_dir: Path) -> list[float]:
    return logged(run_dir, "loss")


def keys_per_step(run_dir: Path) -> dict[int, list]:
    """step -> the sorted (epoch, key) pairs every rank trained on (rows in any order: the layout's)."""
    steps: dict[int, list] = {}
    for path in sorted((run_dir / "keys").glob("rank_*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            steps.setdefault(record["step"], []).extend(map(tuple, record["keys"]))
    return {step: sorted(keys) for step, keys in steps.items()}


# How each reference run is launched: engine -> (overrides, what its output must show). Runs start on first use,
# so an engine whose tests are all deselected (the `make test-all` ones) costs make test nothing.
LAUNCHES = {
    "ddp": (["parallel=ddp"], None),
    "ddp4": (["parallel=ddp"], None),  # (4 ranks: NPROC)
    "zero1": (["parallel=zero1"], None),
    "zero2": (["parallel=zero2"], None),
    "zero3": (["parallel=zero3"], None),
    "fsdp": (["parallel=fsdp"], None),
    # Gradient caching under ZeRO-2: 2 micro-batches per rank make the same global batch.
    "zero2_cached": (["parallel=zero2", MICRO2], None),
    # ... and under FSDP2 (synchronisation off for the first re-forward, one reduce-scatter on the last);
    "fsdp_cached": (["parallel=fsdp", MICRO2], None),
    # ... the same with train.compile on: each block compiled before fully_shard wraps it (the log line is printed
    # only once the first compiled call has succeeded; a failed compile falls back to eager with a warning instead).
    "fsdp_cached_compiled": (
        ["parallel=fsdp", MICRO2, "train.compile=true"],
        "torch.compile: 5 blocks compiled",
    ),
    # train.compile=step under DDP: forward, loss, backward, clipping and the update compiled as one call on each
    # rank (dynamo splits the forward at DDP's gradient buckets; the all-reduce runs in backward as in eager).
    "ddp_step": (["parallel=ddp", "train.compile=step"], "torch.compile: the training step compiled"),
}


NPROC = {"ddp4": 4}
SINGLE = {"single": [], "workers3": ["data.num_workers=3"]}  # one process each (the last value of a key wins)


class Runs(dict):
    """engine -> run dir, each run launched when a test first asks for it."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, engine: str) -> Path:
        run = self.root / engine
        if engine in SINGLE:
            run_cli("train", f"hydra.run.dir={run}", *COMMON, *SINGLE[engine], check=True)
        else:
            overrides, shows = LAUNCHES[engine]
            proc = torchrun(run, *overrides, nproc=NPROC.get(engine, 2))
            if engine.startswith("zero"):  # (a C++ op DeepSpeed would compile for inference only, 22 s once)
                assert "shm_comm" not in proc.stdout + proc.stderr
            if shows:
                assert (proc.stdout + proc.stderr).count(shows) == 2  # one per rank
                assert "torch.compile failed" not in proc.stdout + proc.stderr
        self[engine] = run
        return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("engines"))


@pytest.mark.parametrize(
    "engine",
    [
        "ddp",
        # (4 ranks from scratch: `make test-all`; in make test the resume chain below trains steps 6-8 on 4 ranks
        # and checks their keys, losses and the final parameters against the single process)
        pytest.param("ddp4", marks=pytest.mark.slow),
        "workers3",
        # (ZeRO-1 and ZeRO-2 without caching: `make test-all`; zero2_cached and zero3 cover clipkit's ZeRO path)
        pytest.param("zero1", marks=pytest.mark.slow),
        pytest.param("zero2", marks=pytest.mark.slow),
        "zero3",
        "zero2_cached",
        "fsdp",
        "fsdp_cached",
        # (inductor on 2 ranks, ~60 s with an empty cache: `make test-all`; make test compiles FSDP's blocks in one
        # process against eager, tests/unit/test_gpu_paths.py)
        pytest.param("fsdp_cached_compiled", marks=pytest.mark.slow),
        # (~2 min of inductor on 2 cores: `make test-all`; make test compiles the step in one process,
        # tests/unit/test_gpu_paths.py)
        pytest.param("ddp_step", marks=pytest.mark.slow),
    ],
)
def test_engine_matches_single_process(runs, engine):
    ref, got = final_weights(runs["single"]), final_weights(runs[engine])
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name  # logit_scale stays 0-d under DeepSpeed too
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
    assert losses(runs[engine]) == pytest.approx(losses(runs["single"]), rel=1e-5)
    # The gradient itself, every step: AdamW and clipping would hide a factor-K gradient error in the parameters.
    assert logged(runs[engine], "grad_norm") == pytest.approx(logged(runs["single"], "grad_norm"), rel=1e-4)
    # The same samples at every step (issue 30), whatever the world size, workers and micro-batches.
    assert keys_per_step(runs[engine]) == keys_per_step(runs["single"])


def test_resume_through_four_layouts_equals_the_uninterrupted_run(runs, tmp_path):
    """Issue 30: stopped (SIGTERM) on 2 ranks after step 3, on 1 process with 2 workers after step 5, on 4 ranks
    after step 8, finished on 2 ranks with 3 workers: the keys of every step, the losses and the final parameters
    are the uninterrupted single process's (each stream continues at its position on every layout)."""
    run = tmp_path / "layouts"
    ddp = ["parallel=ddp", "parallel.signal_check_every=1"]
    shown = "data streams resumed on another layout"
    out = torchrun(run, *ddp, "data.num_workers=1", faults="sigterm:step@3").stderr
    assert "SIGTERM: stopped after step 3" in out, out[-3000:]
    env = {"CLIPKIT_FAULTS": "sigterm:step@5", "OMP_NUM_THREADS": "1"}
    one = run_cli("train", f"hydra.run.dir={run}", *COMMON, *ddp, "data.num_workers=2", env=env)
    assert one.returncode == 0 and "SIGTERM: stopped after step 5" in one.stderr, one.stderr[-3000:]
    assert f"{shown} (2 rank(s) x 1 worker(s) -> 1 x 2)" in one.stderr
    out = torchrun(run, *ddp, "data.num_workers=1", nproc=4, faults="sigterm:step@8").stderr
    assert "SIGTERM: stopped after step 8" in out and f"{shown} (1 rank(s) x 2 worker(s) -> 4 x 1)" in out
    out = torchrun(run, *ddp, "data.num_workers=3").stderr
    assert f"{shown} (4 rank(s) x 1 worker(s) -> 2 x 3)" in out
    assert keys_per_step(run) == keys_per_step(runs["single"])
    assert losses(run) == pytest.approx(losses(runs["single"]), rel=1e-5)
    for name, ref in final_weights(runs["single"]).items():
        torch.testing.assert_close(final_weights(run)[name], ref, atol=ATOL, rtol=0, msg=name)


def test_zero3_resume_and_export(runs, tmp_path):
    """A ZeRO-3 checkpoint resumes exactly (DeepSpeed shards inside clipkit's verified dir) and exports."""
    run = tmp_path / "zero3"
    shutil.copytree(runs["zero3"], run)
    step5 = run / "checkpoints" / "step_00000005"
    manifest = json.loads((step5 / "manifest.json").read_text())
    assert any(name.startswith("deepspeed/") for name in manifest["files"])  # DS shards are checksummed too
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    proc = torchrun(run, "parallel=zero3")
    assert "resumed from" in proc.stderr and "step 5" in proc.stderr
    for name, ref in final_weights(runs["zero3"]).items():
        assert torch.equal(final_weights(run)[name], ref), name
    assert losses(run)[-5:] == losses(runs["zero3"])[-5:]

    out = tmp_path / "export"
    run_cli("export", f"checkpoint={run}", "format=open_clip", f"out={out}", check=True)
    assert (out / "open_clip_model.safetensors").is_file()


def test_fsdp_async_checkpoints_stop_and_resume_exactly(runs, tmp_path):
    """train.async_checkpoint=true: the step-5 save is written in the background while training goes on; a
    SIGTERM after step 7 waits for it, saves step 7, exits 0; the checkpoints hold torch DCP shards (checksummed
    in the manifest) and the consolidated weights; the resumed run (same world size) equals the synchronous one
    bit for bit (an asynchronous save changes when files are written, not what is computed)."""
    run = tmp_path / "fsdp_async"
    args = ["parallel=fsdp", "train.async_checkpoint=true", "parallel.signal_check_every=1"]
    stopped = torchrun(run, *args, faults="sigterm:step@7")
    assert "SIGTERM: stopped after step 7" in stopped.stderr, stopped.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005", "step_00000007"]
    manifest = json.loads((run / "checkpoints" / "step_00000005" / "manifest.json").read_text())
    assert any(name.startswith("dcp/") for name in manifest["files"]) and "model.safetensors" in manifest["files"]
    proc = torchrun(run, *args)
    assert "resumed from" in proc.stderr and "step 7" in proc.stderr
    assert_same_run(run, runs["fsdp"])
    blocked = [r["checkpoint_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert blocked[5] > 0  # the step-5 save held the loop for its copy (step 6's record), then went on


def test_fsdp_bf16_with_gradient_checkpointing_trains_and_evaluates(tmp_path):
    """FSDP's bf16 policy (bf16 compute, fp32 reduction and master shards) with activation checkpointing inside
    the sharded blocks: the loss falls and the end-of-run eval runs on the unsharded bf16 copies (it failed with a
    dtype mismatch before full_params() entered autocast)."""
    run = tmp_path / "fsdp_bf16"
    args = ["parallel=fsdp", "train.precision=bf16", "model.grad_checkpointing=true", "eval.zeroshot.dataset=demo"]
    torchrun(run, *args, "train.steps=4")
    assert all(math.isfinite(x) for x in losses(run)) and losses(run)[-1] < losses(run)[0], losses(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["zeroshot"]["num_samples"] == 36, summary["eval"]


@pytest.mark.parametrize(
    ("before", "after"),
    [(2, 4), pytest.param(4, 2, marks=pytest.mark.slow)],  # (4 -> 2: `make test-all`; one direction suffices)
    ids=["2to4", "4to2"],
)
def test_fsdp_resumes_on_another_number_of_ranks(runs, tmp_path, before, after):
    """torch DCP reshards model and optimizer state; the data streams continue at their positions on the new
    world size, so the resumed run must reach the single-process parameters."""
    run = tmp_path / f"fsdp{before}to{after}"
    stopped = torchrun(run, "parallel=fsdp", "parallel.signal_check_every=1", nproc=before, faults="sigterm:step@5")
    assert "SIGTERM: stopped after step 5" in stopped.stderr, stopped.stderr[-3000:]
    proc = torchrun(run, "parallel=fsdp", nproc=after)
    assert "resumed from" in proc.stderr and "step 5" in proc.stderr
    ref, got = final_weights(runs["single"]), final_weights(run)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
    assert logged(run, "grad_norm")[-5:] == pytest.approx(logged(runs["single"], "grad_norm")[-5:], rel=1e-4)


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    for name, ref in final_weights(ref_dir).items():
        assert torch.equal(final_weights(run_dir)[name], ref), name
    assert losses(run_dir) == losses(ref_dir)


def launch_env(**extra: str) -> dict:
    venv_bin = str(Path(sys.executable).parent)  # torchrun / deepspeed of this environment
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{venv_bin}:{os.environ['PATH']}", **extra}


def test_two_loopback_nodes_equal_one_node(runs, tmp_path):
    """launch/torchrun_multi_node.sh on two "nodes" (one process each, c10d rendezvous on 127.0.0.1) computes
    what one 2-process node computes, bit for bit."""
    env = launch_env(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RUN_ID="loopback")
    cmd = ["bash", str(LAUNCH / "torchrun_multi_node.sh"), f"hydra.run.dir={tmp_path}", *COMMON]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(tmp_path, runs["ddp"])


def test_deepspeed_launcher_equals_torchrun(runs, tmp_path):
    """launch/deepspeed.sh (the DeepSpeed launcher, which appends --local_rank) = the same engine under torchrun."""
    env = launch_env(NPROC="2", MASTER_PORT=str(free_port()))
    cmd = [
        "bash",
        str(LAUNCH / "deepspeed.sh"),
        f"hydra.run.dir={tmp_path}",
        *COMMON,
        "data.num_workers=1",
        "parallel=zero2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path, runs["zero2"])
