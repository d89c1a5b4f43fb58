"""End-to-end `clipkit train` / `clipkit eval` through the real CLI on the small demo data."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import DEMO_RUN_ARGS, IN_PROCESS_DATA, SMALL_DEMO, run_cli

RUN_ARGS = DEMO_RUN_ARGS


def _losses(run_dir):
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }


@pytest.fixture(scope="module")
def finished_run(demo_run):
    return demo_run


def test_train_writes_metrics_summary_checkpoints(finished_run):
    run_dir, proc = finished_run
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.3, (first, last)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "samples_seen", "loss", "lr", "logit_scale", "samples_per_s"} <= set(record)
    assert {"samples_per_s_per_rank", "mfu", "data_wait_pct", "peak_mem_gb"} <= set(record)
    assert record["mfu"] is None and record["peak_mem_gb"] > 0.1  # no peak FLOP/s known for a CPU
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 40 and summary["samples_seen"] == 40 * 128
    zs = summary["eval"]["zeroshot"]
    assert zs["chance"] == pytest.approx(1 / 36) and 0 <= zs["acc1"] <= 1
    assert "image_to_text_R@1" in summary["eval"]["retrieval"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    assert (run_dir / "config.yaml").is_file()
    assert "zero-shot top-1" in proc.stdout and "chance" in proc.stdout
    final = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert final and final[-1]["step"] == 40 and final[-1]["eval"]["zeroshot"]["acc1"] == zs["acc1"]


def test_killed_run_resumes_with_bit_identical_losses(finished_run, tmp_path):
    reference = _losses(finished_run[0])
    run_dir = tmp_path / "run-b"
    # SIGKILL at step 27 from inside (the fault hook): the same point on any machine, however slow or loaded
    proc = run_cli("train", f"hydra.run.dir={run_dir}", *RUN_ARGS, env={"CLIPKIT_FAULTS": "kill:step@27"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed_at = max(_losses(run_dir))
    assert 20 <= killed_at <= 27, killed_at  # killed mid-run, after the step-20 checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000020"]

    resumed = run_cli("train", f"hydra.run.dir={run_dir}", *RUN_ARGS, check=True)
    assert "resumed from" in resumed.stderr and "step_00000020" in resumed.stderr
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 41))  # lines past the checkpoint were dropped, then rewritten
    for step in range(21, 41):
        assert losses[step] == reference[step], (step, losses[step], reference[step])


def test_eval_verb_on_a_run_dir(finished_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("eval", f"checkpoint={finished_run[0]}", f"eval.output={out}", check=True)
    result = json.loads(out.read_text())
    summary = json.loads((finished_run[0] / "summary.json").read_text())
    assert result["eval"]["zeroshot"]["acc1"] == summary["eval"]["zeroshot"]["acc1"]
    assert "step_00000040" in result["model"] and "zero-shot top-1" in proc.stdout


def test_resuming_a_different_config_is_refused(finished_run):
    saved = (finished_run[0] / "config.yaml").read_text()
    proc = run_cli("train", f"hydra.run.dir={finished_run[0]}", *RUN_ARGS, "optim.lr=0.5")
    assert proc.returncode == 1 and "optim.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert (finished_run[0] / "config.yaml").read_text() == saved  # the run dir still describes the run


@pytest.mark.parametrize("fmt", ["open_clip", "hf", "onnx", "towers"])
def test_export_verb_round_trip(finished_run, tmp_path, fmt):
    """`clipkit export` writes the folder and checks it in its consumer; here it is loaded once more, independently."""
    import open_clip
    import torch

    from clipkit.checkpoint import resolve
    from clipkit.evaluate import load_trained

    out = tmp_path / fmt
    proc = run_cli("export", f"checkpoint={finished_run[0]}", f"format={fmt}", f"out={out}", check=True)
    assert "reloaded by its consumer" in proc.stdout
    built, _ = load_trained(resolve(finished_run[0]), torch.device("cpu"))
    built.model.eval()
    images = torch.randn(3, 3, built.image_size, built.image_size, generator=torch.Generator().manual_seed(5))
    text = built.tokenizer(["a red circle", "two blue stars on a dark background", "a large green square"])
    with torch.no_grad():
        ref_img, ref_txt = built.model.encode_image(images), built.model.encode_text(text)
        if fmt == "open_clip":
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
            got_img, got_txt = model.eval().encode_image(images), model.encode_text(text)
        elif fmt == "towers":
            from clipkit.export import load_tower

            got_img, got_txt = load_tower(out / "image_encoder")(images), load_tower(out / "text_encoder")(text)
        elif fmt == "onnx":
            import onnxruntime as ort

            def run(name, x):
                sess = ort.InferenceSession(str(out / f"{name}_encoder.onnx"), providers=["CPUExecutionProvider"])
                return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])

            got_img, got_txt = run("image", images), run("text", text)  # batch 3: the export used 2
        else:
            from transformers import CLIPModel

            hf = CLIPModel.from_pretrained(out).eval()
            got_img, got_txt = hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=text)
            got_img = got_img if isinstance(got_img, torch.Tensor) else got_img.pooler_output
            got_txt = got_txt if isinstance(got_txt, torch.Tensor) else got_txt.pooler_output
    assert (got_img - ref_img).abs().max() < 1e-4 and (got_txt - ref_txt).abs().max() < 1e-4


def test_export_refuses_unmappable_architecture(finished_run, tmp_path):
    from clipkit.config import RootConfig
    from clipkit.export import ExportError, export
    from clipkit.model import build

    cfg = RootConfig()
    cfg.model.init_logit_bias = -10.0  # a SigLIP head has no CLIPModel equivalent
    with pytest.raises(ExportError, match="does not map to transformers' CLIPModel.*logit bias"):
        export(build(cfg.model), cfg, "hf", tmp_path)


def test_export_needs_checkpoint_and_out():
    proc = run_cli("export", "format=hf")
    assert proc.returncode == 2 and "checkpoint" in proc.stderr


def test_init_from_every_source_form(finished_run, tmp_path):
    """model.init_from accepts a run dir, a checkpoint dir, an open_clip export and a safetensors file."""
    import torch
    from safetensors.torch import load_file

    from clipkit import checkpoint as ckpt

    run = finished_run[0]
    final = load_file(str(run / "checkpoints" / "step_00000040" / "model.safetensors"))
    export_dir = tmp_path / "oc"
    run_cli("export", f"checkpoint={run}", "format=open_clip", f"out={export_dir}", check=True)
    for source in (
        run,
        run / "checkpoints" / "step_00000040",
        export_dir,
        run / "checkpoints" / "step_00000040" / "model.safetensors",
    ):
        weights = load_file(str(ckpt.weights_file(source)))
        assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final), source


def test_training_continues_from_init_from(finished_run, tmp_path):
    args = [
        *SMALL_DEMO,
        *IN_PROCESS_DATA,
        "train.steps=4",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "logging.progress=false",
        "logging.report=false",
        "eval.zeroshot.dataset=",
        "eval.retrieval.dataset=",
    ]
    run_cli("train", f"hydra.run.dir={tmp_path}", f"model.init_from={finished_run[0]}", *args, check=True)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first < _losses(finished_run[0])[1] - 0.3  # starts where the finished run ended, not from scratch
    bad = run_cli("train", f"hydra.run.dir={tmp_path / 'x'}", "model.init_from=/etc/hostname", *args)
    assert bad.returncode == 2 and "model.init_from" in bad.stderr


def test_moving_the_data_changes_nothing(small_demo, tmp_path):
    """Seeds come from (seed, epoch, shard path relative to its pattern, key): the same run on two copies of the
    data in different folders gives bit-identical losses."""
    import shutil

    losses = []
    for where in ("a/copy", "elsewhere/deeper/copy"):
        data = tmp_path / where
        shutil.copytree(small_demo / "train", data)
        run = tmp_path / f"run-{len(losses)}"
        args = ["train.steps=6", "train.log_every=1", "eval.zeroshot.dataset=", "eval.retrieval.dataset="]
        run_cli("train", f"hydra.run.dir={run}", f"data.train={data}/*.tar", *RUN_ARGS[:4], *args, check=True)
        losses.append(_losses(run))
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_towers_export_of_a_quickgelu_model(tmp_path):
    """format=towers rebuilds each tower from its config: a quick-GELU model (the *-quickgelu open_clip configs,
    OpenAI's weights) must come back with quick GELU, or its embeddings differ."""
    from clipkit.config import RootConfig
    from clipkit.export import export
    from clipkit.model import build
    from clipkit.model_config import SHIPPED_CONFIGS

    cfg_json = json.loads((SHIPPED_CONFIGS / "clipkit-tiny.json").read_text())
    cfg_json["quick_gelu"] = True
    path = tmp_path / "tiny-quickgelu.json"
    path.write_text(json.dumps(cfg_json))
    cfg = RootConfig()
    cfg.model.config = str(path)
    result = export(build(cfg.model), cfg, "towers", tmp_path / "out")
    assert max(result["image_max_abs_diff"], result["text_max_abs_diff"]) < 1e-5
    assert json.loads((tmp_path / "out" / "image_encoder" / "tower_config.json").read_text())["quick_gelu"] is True


def test_resume_with_patch_dropout_and_evals_is_bit_exact(small_demo, tmp_path):
    """Patch dropout draws from torch's global CPU generator; neither the loader (re)starting after a resume nor
    an eval right after a checkpoint may draw from it, or the resumed run's masks differ from step 9 on."""
    args = [
        *SMALL_DEMO,
        "train.steps=12",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "eval.every=4",  # zero-shot and retrieval: two eval loaders per eval
        "model.patch_dropout=0.5",
        "optim.warmup_steps=2",
        "train.global_batch_size=32",
        "logging.progress=false",
        "logging.report=false",
    ]
    run_cli("train", f"hydra.run.dir={tmp_path / 'ref'}", *args, check=True)
    killed = run_cli("train", f"hydra.run.dir={tmp_path / 'run'}", *args, env={"CLIPKIT_FAULTS": "kill:step@9"})
    assert killed.returncode == -9
    run_cli("train", f"hydra.run.dir={tmp_path / 'run'}", *args, check=True)
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 13)) and [got[s] for s in range(9, 13)] == [ref[s] for s in range(9, 13)]
