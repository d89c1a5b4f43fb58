"""GPU tests (marker ``gpu``; skipped without CUDA). Run on a GPU machine with ``pytest -m gpu tests/gpu`` or as the
first step of ``benchmarks/gpu_suite.sh``.

- the loss exactness suite on NCCL: the float64 cases of ``tests/distributed`` on CUDA, at world size 1 and, where
  the machine has more GPUs, at world size 2; plus the autograd-aware gather's NCCL branch (reduce-scatter);
- bf16 training of a few steps for every engine on one GPU (the single-process engine, ZeRO-1/2/3, FSDP),
  through the CLI;
- ``clipkit bench`` (clipkit vs open_clip's step; MFU from the data-sheet peak within (0, 1));
- the exports of a GPU-trained run (each export verifies itself by loading it in its consumer);
- the tiled loss's CUDA memory: at a global batch of 16k its peak is a small fraction of the gathered loss's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import SMALL_DEMO, run_cli
from tests.ports import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOL = 1e-6
TRAIN = [
    *SMALL_DEMO,
    "train.steps=6",
    "train.global_batch_size=64",
    "train.log_every=1",
    "train.checkpoint_every=6",
    "train.precision=bf16",
    "optim.warmup_steps=2",
    "logging.progress=false",
    "logging.report=false",
    "eval.zeroshot.dataset=demo",
    "eval.retrieval.dataset=demo",
]


def _exactness(world: int, tmp_path) -> dict:
    out = tmp_path / f"exact-w{world}.json"
    code = (
        "import sys, torch.multiprocessing as mp\n"
        "from tests.distributed.workers import loss_exactness\n"
        f"mp.start_processes(loss_exactness, args=({world}, {free_port()}, {str(out)!r}, 'cuda'), nprocs={world},"
        " start_method='spawn')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("world", [1, 2])
def test_loss_exactness_on_nccl(world, tmp_path):
    if world > torch.cuda.device_count():
        pytest.skip(f"needs {world} GPUs")
    results = _exactness(world, tmp_path)
    for case, r in results.items():
        if "missing_grads" in r:
            assert r["missing_grads"] == [], (case, r)
        assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), (case, r)
        assert r["max_grad_rel_err"] <= TOL, (case, r)


GATHER = r"""
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("nccl", rank=0, world_size=1)
torch.cuda.set_device(0)
from clipkit.distributed import _AllGatherWithGrad
x = torch.randn(5, 7, device="cuda", dtype=torch.float64, requires_grad=True)
g = torch.randn(5, 7, device="cuda", dtype=torch.float64)
y = _AllGatherWithGrad.apply(x)  # the NCCL branch: all_gather forward, reduce_scatter backward
(y * g).sum().backward()
assert torch.equal(y, x) and torch.equal(x.grad, g), (x.grad - g).abs().max()
dist.destroy_process_group()
print("ok")
"""


def test_autograd_gather_nccl_branch():
    env = {**os.environ, "PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", GATHER], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _train(run_dir, engine: str):
    return run_cli("train", f"hydra.run.dir={run_dir}", *TRAIN, f"parallel={engine}", timeout=900)


@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_bf16_training_on_one_gpu(small_demo, tmp_path, engine):
    """Each engine trains in bf16 on one GPU (each run its own test, so that pytest-xdist runs them side by side
    in the GPU suite)."""
    proc = _train(tmp_path, engine)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"], [r["loss"] for r in steps]
    assert all(0 < r["mfu"] < 1 for r in steps), [r["mfu"] for r in steps]  # a data-sheet peak is known
    assert sum(r.get("skipped_steps", 0) for r in steps) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval"], summary


@pytest.fixture(scope="module")
def ddp_run(small_demo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpu-ddp")
    proc = _train(run_dir, "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.xdist_group("exports")  # (one worker: the exports share one run)
@pytest.mark.parametrize("fmt", ["open_clip", "hf", "onnx", "towers"])
def test_exports_of_a_gpu_run(ddp_run, tmp_path, fmt):
    needs = {"hf": "transformers", "onnx": "onnxruntime"}.get(fmt)
    if needs:
        pytest.importorskip(needs)  # (the GPU image has both)
    out = tmp_path / fmt
    export = run_cli("export", f"checkpoint={ddp_run}", f"format={fmt}", f"out={out}", timeout=900)
    assert export.returncode == 0, export.stderr[-3000:]
    assert any(out.iterdir())


def test_bench_on_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", "model=vit_b32", "train.global_batch_size=64", "train.precision=bf16", "bench.steps=5",
        "bench.warmup=3", f"bench.output={out}", f"hydra.run.dir={tmp_path}", timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and result["peak_kind"].startswith("data sheet")
    for side in ("clipkit", "open_clip"):
        assert 0 < result["results"][side]["mfu"] < 1, result


MEMORY = r"""
import math, torch, torch.nn.functional as F
from clipkit.loss import InfoNCELoss
n, d = 16384, 512
img = F.normalize(torch.randn(n, d, device="cuda"), dim=-1).requires_grad_()
txt = F.normalize(torch.randn(n, d, device="cuda"), dim=-1).requires_grad_()
scale = torch.tensor(math.log(1 / 0.07), device="cuda").exp().requires_grad_()
peaks = {}
for impl in ("gathered", "tiled"):
    img.grad = txt.grad = scale.grad = None
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    InfoNCELoss(impl, "auto")(img, txt, scale).backward()
    torch.cuda.synchronize()
    peaks[impl] = torch.cuda.max_memory_allocated() - base
print(peaks["gathered"], peaks["tiled"])
"""


def test_tiled_loss_cuda_memory():
    proc = subprocess.run([sys.executable, "-c", MEMORY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered, tiled = map(int, proc.stdout.split())
    # The gathered loss keeps N x N fp32 logits (1 GiB at 16k) and their softmax; tiled keeps O(N x chunk).
    assert gathered > 2**30 and tiled < gathered / 8, (gathered, tiled)
