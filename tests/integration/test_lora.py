"""model.lora through the real CLI: adapters on a "pretrained" clipkit-tiny train while its weights stay as the file
has them; a checkpoint holds the adapters (and what else trains) with their optimizer state, never the frozen
weights; a run killed with SIGKILL resumes bit-identically; two DDP ranks and two gradient-cached FSDP ranks train
what one process trains; the open_clip export (merged, read by open_clip without peft) gives the adapted model's
embeddings; changed base weights are refused.

Same data and tolerance as test_engines.py: global batches of 48 of 96 pairs, float32, ATOL 1e-5."""

from __future__ import annotations

import json
import re
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipkit import lora
from clipkit.model import build
from clipkit.model_config import LoraConfig, ModelConfig
from tests.conftest import run_cli
from tests.integration.test_engines import COMMON, STEPS, assert_same_training, final_weights, losses, torchrun

# At optim.lr=0.01 (20x the default), AdamW turns the layouts' float rounding into weight differences near ATOL
# at the engines' global batch of 48 (1.4e-5 on one adapter, 2 DDP ranks against one process): these runs keep
# a batch of 192 of 384 pairs, whose gradients average that rounding down (2 micro-batches of 48 per rank).
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=0.01"]
LORA += ["data.demo.num_train=384", "data.demo.shard_size=128", "train.global_batch_size=192"]
MICRO2 = "train.micro_batch_size=48"


@pytest.fixture(scope="module")
def single(tower, tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("lora") / "single"
    proc = run_cli("train", f"hydra.run.dir={run}", *COMMON, *LORA, f"model.init_from={tower[0]}", check=True)
    assert "LoRA r=4 alpha=8 on 20 layers (both towers, attn+mlp): 0.029M adapter params" in proc.stderr
    return run


def test_checkpoint_holds_the_adapters_and_their_optimizer_state_only(single, tower):
    saved = final_weights(single)
    adapters = {k for k in saved if ".lora_" in k}
    assert len(adapters) == 2 * 4 * 5  # A and B, 4 layers per block, 4 image blocks + 1 text block
    assert set(saved) == adapters | {"logit_scale"}  # nothing of the frozen towers
    step = single / "checkpoints" / f"step_{STEPS:08d}"
    engine = torch.load(step / "engine.pt", map_location="cpu", weights_only=True)
    assert len(engine["optimizer"]["state"]) == len(saved)  # AdamW moments for what trains only
    assert json.loads((step / "lora.json").read_text())["base_sha256"]
    moved = [k for k in adapters if ".lora_B." in k and saved[k].abs().max() > 0]
    assert len(moved) == 20  # every B left zero, where LoRA starts
    assert (step / "model.safetensors").stat().st_size < 0.05 * (base_size := sum(
        v.numel() * v.element_size() for v in tower[1].values()))  # fmt: skip
    assert base_size > 10_000_000


def test_export_merges_the_adapters_into_what_open_clip_loads(single, tower, tmp_path):
    out = tmp_path / "export"
    proc = run_cli("export", f"checkpoint={single}", "format=open_clip", f"out={out}", check=True)
    assert "max abs embedding difference image 0.00e+00" in proc.stdout
    # the adapted model, built here from the base file and the checkpoint's adapters (not merged)
    torch.manual_seed(0)
    adapted = build(ModelConfig()).model
    adapted.load_state_dict(tower[1])
    lora.apply(adapted, LoraConfig(rank=4, alpha=8))
    lora.load_saved(adapted, final_weights(single), single)
    exported = open_clip.create_model(f"local-dir:{out}", output_dict=True)  # (open_clip alone: no peft)
    assert not any(".lora_" in n for n in exported.state_dict())
    torch.manual_seed(5)
    images = torch.randn(4, 3, 32, 32)
    text = open_clip.get_tokenizer("clipkit-tiny")(["a photo of a 3", "a 7", "the digit nine", "zero"])
    adapted.eval(), exported.eval()
    with torch.no_grad():
        want, got = adapted(images, text), exported(images, text)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)
    # the frozen weights were not trained: each exported weight is the base one plus (alpha / r) B A
    merged = exported.state_dict()
    assert torch.equal(merged["visual.conv1.weight"], tower[1]["visual.conv1.weight"])
    assert torch.equal(merged["token_embedding.weight"], tower[1]["token_embedding.weight"])
    name = "visual.transformer.resblocks.1.mlp.c_fc"
    a, b = (final_weights(single)[f"{name}.lora_{ab}.default.weight"] for ab in "AB")
    torch.testing.assert_close(merged[f"{name}.weight"], tower[1][f"{name}.weight"] + 2 * b @ a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["hf", "onnx", "towers"])
def test_every_export_format_loads_the_merged_model_in_its_consumer(single, tmp_path, fmt):
    """The other formats export the same merged model (above: equal to the adapted one); each export is read back
    by its consumer (transformers, onnxruntime, clipkit's tower loader), none of which knows peft."""
    proc = run_cli("export", f"checkpoint={single}", f"format={fmt}", f"out={tmp_path / fmt}", check=True)
    found = re.search(r"max abs embedding difference image ([\d.e+-]+), text ([\d.e+-]+)", proc.stdout)
    assert found and float(found[1]) < 1e-5 and float(found[2]) < 1e-5, proc.stdout
    assert not any("lora" in p.name for p in (tmp_path / fmt).rglob("*"))


def test_killed_run_resumes_bit_identically(single, tower, tmp_path):
    run = tmp_path / "killed"
    args = ["train", f"hydra.run.dir={run}", *COMMON, *LORA, f"model.init_from={tower[0]}"]
    killed = run_cli(*args, env={"CLIPKIT_FAULTS": "kill:step@7"})  # kill -9 after step 7 (checkpoint: 5)
    assert killed.returncode != 0
    assert (run / "checkpoints" / "step_00000005").is_dir()
    resumed = run_cli(*args, check=True)
    assert "resumed from" in resumed.stderr and "step_00000005" in resumed.stderr
    assert losses(run) == losses(single)
    got, want = final_weights(run), final_weights(single)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("engine", ["ddp", "fsdp_cached"])
def test_two_ranks_train_what_one_process_trains(single, tower, tmp_path, engine):
    name, _, cached = engine.partition("_")
    run = tmp_path / engine
    extra = [MICRO2] if cached else []
    torchrun(run, f"parallel={name}", *LORA, f"model.init_from={tower[0]}", *extra)
    assert_same_training(run, single)


def test_changed_base_weights_are_refused(tower, tmp_path):
    """The checkpoint holds adapters for the base weights it trained on: when the file behind model.init_from
    changed since, resuming the run and evaluating its checkpoint are refused, naming the file."""
    own = tmp_path / "base.safetensors"
    shutil.copy(tower[0], own)
    run = tmp_path / "run"
    args = ["train", f"hydra.run.dir={run}", *COMMON, *LORA, f"model.init_from={own}", "train.steps=5"]
    run_cli(*args, check=True)
    weights = dict(tower[1])
    weights["visual.conv1.weight"] = weights["visual.conv1.weight"] + 1e-3
    save_file({k: v.contiguous() for k, v in weights.items()}, str(own))
    proc = run_cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "trained on other base weights" in proc.stderr and str(own) in proc.stderr
    proc = run_cli("eval", f"checkpoint={run}", f"eval.output={tmp_path / 'e.json'}")
    assert proc.returncode == 1 and "trained on other base weights" in proc.stderr, proc.stderr[-2000:]
