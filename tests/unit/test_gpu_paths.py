"""What a first run on a GPU depends on, checked where a CPU can reach it (issue 27): TF32 for fp32 math on CUDA,
the bench feeding both trainers the way their loaders do, and the temperature kept in fp32 under FSDP's bf16
policy. (The ZeRO autocast state is in ``tests/integration/test_engines.py``; the GPU figures themselves come
from ``benchmarks/gpu_suite.sh``.)"""

from __future__ import annotations

import pytest
import torch

from clipkit import distributed
from tests.ports import free_port


@pytest.fixture
def fp32_math():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.parametrize("tf32", [True, False])
def test_a_cuda_run_sets_tf32_as_configured(monkeypatch, fp32_math, tf32):
    """distributed.init on a (pretended) CUDA device turns TF32 on for matmuls and convolutions, or off with
    train.tf32=false; the calls that would touch a real GPU are stubbed, the flags are torch's own."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = not tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = distributed.init("auto", tf32=tf32)
    assert env.device.type == "cuda"
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.allow_tf32 is tf32  # (a library's read of the legacy flag still works)


def test_a_local_rank_beyond_the_visible_gpus_is_named(monkeypatch):
    """Eight ranks per node launched where four GPUs are visible: rank 5 says so instead of CUDA's invalid
    device ordinal."""
    from clipkit.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="local rank 5 has no GPU \\(4 visible\\)"):
        distributed.init("auto")


def test_a_cpu_run_keeps_full_fp32(fp32_math):
    torch.set_float32_matmul_precision("highest")
    assert distributed.init("cpu").device.type == "cpu"
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.fixture
def process_group(monkeypatch):
    """A single-process gloo group for an engine built in this test process, gone again afterwards."""
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fsdp_bf16_keeps_the_temperature_and_bias_in_fp32(process_group):
    """Under FSDP's bf16 policy the temperature's exp runs in fp32, as under DDP's autocast: 100.003 stays
    100.003 (bf16 would give 99.0) and the SigLIP bias keeps its fp32 value; the blocks still compute in bf16;
    the bias trains."""
    import math

    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.engine import build_engine
    from tests.distributed.workers import micro_clip

    cfg = RootConfig()
    cfg.train.precision, cfg.parallel.engine = "bf16", "fsdp"
    model = micro_clip(siglip=True).float()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.003))
        model.logit_bias.fill_(-10.03)
    engine = build_engine(model, cfg, DistEnv())
    seen = {}
    block = engine.model.visual.transformer.resblocks[0]
    block.register_forward_hook(lambda mod, args, out: seen.update(block=out.dtype))
    out = engine.forward(torch.randn(4, 3, 16, 16), torch.randint(1, 400, (4, 8)))
    assert out["logit_scale"].dtype == torch.float32 and out["logit_bias"].dtype == torch.float32
    assert out["logit_scale"].item() == pytest.approx(100.003, rel=1e-6)
    assert out["logit_bias"].item() == pytest.approx(-10.03, rel=1e-6)
    assert seen["block"] == torch.bfloat16
    # The bias is the parameter itself (open_clip returns it): still readable by the loss and trained through it
    # (a resharded root once freed its storage under the loss: a crash of FSDP + SigLIP, precision aside).
    loss = (out["image_features"] * out["text_features"]).sum() * out["logit_scale"] + out["logit_bias"]
    engine.backward([loss.float()])
    norm, applied = engine.step()
    assert bool(applied) and engine.model.logit_bias.grad is None  # (applied, then zeroed)
    assert engine.model.logit_bias.full_tensor().item() != pytest.approx(-10.03, rel=1e-9)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict:
    import json

    from tests.distributed.ranks import start_ranks
    from tests.distributed.workers import zero_precision_and_offload

    out = tmp_path_factory.mktemp("zero") / "zero.json"
    start_ranks(zero_precision_and_offload, (1, free_port(), str(out)), nprocs=1)
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_zero_forward_runs_under_the_same_autocast_as_ddp(zero_runs, engine):
    """DeepSpeed's forward used to switch a CUDA bf16 autocast off (no torch_autocast section): ZeRO trained in
    fp32 on a GPU. Inside the model's forward, ZeRO now sees what DDP sees."""
    assert zero_runs["precision"]["ddp"] == {"autocast": True, "dtype": "torch.bfloat16", "out": "torch.bfloat16"}
    assert zero_runs["precision"][engine] == zero_runs["precision"]["ddp"]


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_zero_offload_starts_and_steps_like_the_same_stage_without_it(zero_runs, engine):
    """parallel.offload_optimizer=true (zero3: and offload_params) used to be refused by DeepSpeed at start (a
    client optimizer with ZeRO-Offload); it trains, and two steps give the parameters of the same stage without
    offload (the same AdamW, on the CPU partitions)."""
    got, want = zero_runs["params"][f"{engine}+offload"], zero_runs["params"][engine]
    assert got.keys() == want.keys()
    worst = max(max(abs(a - b) for a, b in zip(got[n], want[n], strict=True)) for n in got)
    assert worst < 1e-6, worst
    moved = max(max(abs(a - b) for a, b in zip(want[n], zero_runs["params"]["ddp"][n], strict=True)) for n in want)
    assert moved < 1e-5, moved  # (every stage steps as one process does)
    trained = max(max(abs(a - b) for a, b in zip(want[n], zero_runs["init"][n], strict=True)) for n in want)
    assert trained > 1e-4, trained  # (and the two steps did move the parameters)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_bench_feeds_both_trainers_as_their_loaders_do(monkeypatch, device):
    """On a GPU each side's batches are pinned (as both loaders pin) so their non_blocking copies overlap the
    step; before, open_clip's side got pageable fp32 batches, copied synchronously. ``pin_memory`` itself needs a
    GPU: here it is recorded, not performed."""
    from clipkit.bench import feeds, synthetic_batches

    pinned = set()

    def pin(t):
        out = t.clone()
        pinned.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batches = synthetic_batches(3, 4, 16, 8, seed=0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    fed, described = feeds(batches, torch.device(device), mean, std)
    tensors = [t for side in fed.values() for batch in side for t in batch]
    assert len(tensors) == 12 and all((id(t) in pinned) == (device == "cuda") for t in tensors)
    assert fed["clipkit"][0][0].dtype == torch.uint8 and fed["open_clip"][0][0].dtype == torch.float32
    want = (batches[1][0].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(fed["open_clip"][1][0], want)
    assert ("pinned" in described["open_clip"]) == (device == "cuda") and "normalised on the host" in described[
        "open_clip"
    ]


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory) -> dict:
    import json

    from tests.distributed.ranks import start_ranks
    from tests.distributed.workers import compiled_vs_eager

    out = tmp_path_factory.mktemp("compile") / "compile.json"
    start_ranks(compiled_vs_eager, (1, free_port(), str(out)), nprocs=1)
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine,graphs", [("ddp", 1), ("fsdp", 2)])
def test_compiled_training_equals_eager_with_a_bounded_number_of_graphs(compile_runs, engine, graphs):
    """train.compile=model (inductor, on the CPU): 5 steps give eager's losses and parameters within float
    tolerance; dynamo makes one graph for the whole model (one block per tower), or (FSDP, blocks compiled one by
    one) one per tower: the 3 blocks of a tower share their graph, nothing recompiles per block or per step,
    nothing breaks."""
    eager, compiled = compile_runs[f"{engine}-eager"], compile_runs[f"{engine}-compiled"]
    assert eager["graphs"] == 0 and compiled["graphs"] == graphs and compiled["graph_breaks"] == 0
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-5)
    worst = max(
        max(abs(a - b) for a, b in zip(compiled["params"][n], eager["params"][n], strict=True)) for n in eager["params"]
    )
    # (5 AdamW steps of lr 1e-3 move a weight by up to 5e-3; the compiled kernels' float rounding, fed through
    # Adam's normalisation, moves some by ~1e-5: 1.2e-5 seen for one block per tower.)
    assert worst < 5e-5, worst


def test_compiled_step_equals_eager_and_skips_a_nonfinite_step_on_the_device(compile_runs):
    """train.compile=step (inductor, on the CPU): 10 steps of forward, loss, backward, clipping and the AdamW update
    as one compiled call give eager's losses, norms and parameters within float tolerance while the learning rate
    warms up (held as a tensor: no recompilation per step); the step whose batch holds a NaN is skipped as in eager
    (nothing applied, parameters and Adam step counts untouched). Dynamo makes two graphs (forward and loss with
    its compiled backward; clip, check and update) over all 10 steps, and breaks only at ``backward`` (counted
    once in each of the 4 frames that lead to it)."""
    eager, compiled = compile_runs["step-false"], compile_runs["step-step"]
    assert eager["graphs"] == 0 and compiled["graphs"] == 2 and compiled["graph_breaks"] == 4
    assert len(compiled["break_reasons"]) == 1 and "function `backward`" in compiled["break_reasons"][0]
    for e, c in zip(eager["steps"], compiled["steps"], strict=True):
        assert c["applied"] == e["applied"] and c["unchanged"] == e["unchanged"] and c["lr"] == e["lr"]
        if e["applied"]:
            assert c["loss"] == pytest.approx(e["loss"], rel=1e-5) and c["norm"] == pytest.approx(e["norm"], rel=1e-4)
    assert [s["applied"] for s in compiled["steps"]] == [True] * 6 + [False] + [True] * 3
    assert compiled["steps"][6]["unchanged"] and not compiled["steps"][7]["unchanged"]
    assert len({s["lr"] for s in compiled["steps"]}) > 4  # (the warmup moved it)
    assert eager["adam_steps"] == compiled["adam_steps"] == [9.0]
    # Every parameter value within 1e-5 of eager, but for at most 1 in 100,000: Adam divides by the root of the
    # squared gradient, so a token-embedding entry whose gradient is zero in one run and rounding-sized in the other
    # moves by up to a learning rate (measured: 1 value of 1.6M, 1.6e-4 apart); none by more than 1e-3 (lr).
    apart = [
        abs(a - b) for n in eager["params"] for a, b in zip(compiled["params"][n], eager["params"][n], strict=True)
    ]
    assert sum(d > 1e-5 for d in apart) <= len(apart) // 100_000 and max(apart) < 1e-3, sorted(apart)[-5:]
