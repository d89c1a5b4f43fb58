"""`clipkit export format=hf` as the Hugging Face ecosystem uses it (issue 29): CLIPProcessor + CLIPModel with the
folder's own tokenizer, the zero-shot pipeline against `clipkit eval`, sentence-transformers, the vision tower a
multimodal LLM reads, the model card; and the destinations an export refuses. Every check loads the folder in its
consumer; the reference is open_clip's model and tokenizer on the checkpoint's weights."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(demo_run):
    from clipkit.checkpoint import resolve
    from clipkit.evaluate import load_trained

    run_dir = demo_run[0]
    built, cfg = load_trained(resolve(run_dir), torch.device("cpu"))
    built.model.eval()
    return run_dir, built, cfg


@pytest.fixture(scope="module")
def hf_dir(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf-export") / "hf"
    proc = run_cli("export", f"checkpoint={trained[0]}", "format=hf", f"out={out}", check=True)
    assert "reloaded by its consumer" in proc.stdout
    return out


CAPTIONS = [
    "a red circle",
    "Two BLUE stars, on a dark background!",
    "çà et là: un carré vert (très grand)",
    "緑の四角",
    "🟥 red square?!",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
]


def test_the_folder_is_complete_and_loads_as_users_load_it(trained, hf_dir):
    from transformers import CLIPModel, CLIPProcessor

    _, built, _ = trained
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json"} <= names
    assert {"merges.txt", "preprocessor_config.json", "processor_config.json", "modules.json", "README.md"} <= names
    processor = CLIPProcessor.from_pretrained(hf_dir)
    tok = processor.tokenizer
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.model_max_length == built.context_length
    ids = processor(text=CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    ours = built.tokenizer(CAPTIONS)
    assert ids.shape == ours.shape  # (model_max_length pads and truncates to the context)
    for a, b in zip(ours, ids, strict=True):
        end = int((a == 49407).nonzero()[0]) + 1  # same ids through the end-of-text token; then HF's padding
        assert a[:end].tolist() == b[:end].tolist() and (b[end:] == 49407).all(), (a, b)
    model = CLIPModel.from_pretrained(hf_dir).eval()
    images = torch.randn(3, 3, built.image_size, built.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got_txt = model.get_text_features(input_ids=ids)
        got_img = model.get_image_features(pixel_values=images)
        got_txt = got_txt if isinstance(got_txt, torch.Tensor) else got_txt.pooler_output
        got_img = got_img if isinstance(got_img, torch.Tensor) else got_img.pooler_output
        assert (got_txt - built.model.encode_text(ours)).abs().max() < 1e-4
        assert (got_img - built.model.encode_image(images)).abs().max() < 1e-4


def test_the_model_card_says_what_was_trained_and_how_it_scored(trained, hf_dir):
    run_dir, _, cfg = trained
    card = (hf_dir / "README.md").read_text()
    head = card.split("---")[1]
    assert "library_name: transformers" in head and "pipeline_tag: zero-shot-image-classification" in head
    assert "- data: `demo`" in card and "steps: 40; global batch 128" in card
    summary = json.loads((run_dir / "summary.json").read_text())
    acc1 = summary["eval"]["zeroshot"]["acc1"]
    assert f"| zeroshot | acc1 | {acc1:.4g} |" in card
    assert "hidden_states[-2][:, 1:]" in card and "truncation=True" in card


def _held_out(small_demo) -> tuple[list, list[int], list[str]]:
    """The demo's zero-shot split as images, labels and class names."""
    from PIL import Image

    split = small_demo / "zeroshot"
    classnames = (split / "classnames.txt").read_text().splitlines()
    images, labels = [], []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    key = name[: -len(".jpg")]
                    images.append(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB"))
                    labels.append(int(tar.extractfile(members[f"{key}.cls"]).read()))
    return images, labels, classnames


@pytest.mark.parametrize(
    "template",
    # (the custom template: `make test-all`, ~12 s; the default one exercises the same path)
    ["This is a photo of {}.", pytest.param("a blurry picture of a {}", marks=pytest.mark.slow)],
)
def test_the_zero_shot_pipeline_predicts_what_clipkit_eval_predicts(small_demo, trained, hf_dir, tmp_path, template):
    """transformers' pipeline with its default template and a custom one, against clipkit's zero-shot classifier
    with that single template: clipkit's per-image predictions give `clipkit eval`'s top-1 exactly, and the
    pipeline agrees with them on at least 99% of the held-out images."""
    from transformers import pipeline

    from clipkit.eval.embedding import eval_transform
    from clipkit.eval.zeroshot import build_classifier

    run_dir, built, _ = trained
    images, labels, classnames = _held_out(small_demo)
    templates = tmp_path / "templates.txt"
    templates.write_text(template.replace("{}", "{c}") + "\n")
    out = tmp_path / "eval.json"
    args = [f"checkpoint={run_dir}", "eval.zeroshot.dataset=demo", "eval.retrieval.dataset="]
    run_cli("eval", *args, f"eval.zeroshot.templates={templates}", f"eval.output={out}", check=True)
    eval_acc1 = json.loads(out.read_text())["eval"]["zeroshot"]["acc1"]

    with torch.no_grad():
        classifier = build_classifier(built.model, built.tokenizer, classnames, [template.replace("{}", "{c}")], "cpu")
        pixels = torch.stack([eval_transform(built.model)(im) for im in images])
        ours = (built.model.encode_image(pixels, normalize=True) @ classifier).argmax(1).tolist()
    assert sum(p == y for p, y in zip(ours, labels, strict=True)) / len(labels) == pytest.approx(eval_acc1, abs=1e-9)

    classify = pipeline("zero-shot-image-classification", model=str(hf_dir), device="cpu")
    kwargs = {} if template == "This is a photo of {}." else {"hypothesis_template": template}
    theirs = [classnames.index(r[0]["label"]) for r in classify(images, candidate_labels=classnames, **kwargs)]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(images)
    print(f"\npipeline vs clipkit, template {template!r}: {agree:.4f} agreement on {len(images)} images", flush=True)
    assert agree >= 0.99, agree


def test_sentence_transformers_encodes_images_and_texts_as_the_model_does(trained, hf_dir):
    pytest.importorskip("sentence_transformers")
    import numpy as np
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from transformers import CLIPImageProcessor

    _, built, _ = trained
    model = SentenceTransformer(str(hf_dir), device="cpu")
    rng = np.random.default_rng(3)
    pictures = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    got_img = torch.as_tensor(model.encode(pictures))
    got_txt = torch.as_tensor(model.encode(CAPTIONS[:4]))
    pixels = CLIPImageProcessor.from_pretrained(hf_dir)(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert (got_img - built.model.encode_image(pixels)).abs().max() < 1e-4
        assert (got_txt - built.model.encode_text(built.tokenizer(CAPTIONS[:4]))).abs().max() < 1e-4


def test_the_vision_tower_gives_a_multimodal_llm_open_clips_penultimate_tokens(trained, hf_dir):
    from transformers import CLIPVisionModel

    _, built, _ = trained
    images = torch.randn(2, 3, built.image_size, built.image_size, generator=torch.Generator().manual_seed(2))
    seen = {}
    block = built.model.visual.transformer.resblocks[-2]
    handle = block.register_forward_hook(lambda module, args, out: seen.update(tokens=out))
    with torch.no_grad():
        built.model.encode_image(images)
        states = CLIPVisionModel.from_pretrained(hf_dir).eval()(pixel_values=images, output_hidden_states=True)
    handle.remove()
    patches = states.hidden_states[-2][:, 1:]  # what the model card tells a LLaVA-style projector to read
    assert patches.shape[1] == (built.image_size // built.model.visual.patch_size[0]) ** 2
    assert (states.hidden_states[-2] - seen["tokens"]).abs().max() < 1e-4


def test_destinations_an_export_refuses_and_nothing_half_written(trained, tmp_path):
    run_dir = trained[0]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    proc = run_cli("export", f"checkpoint={run_dir}", "format=hf", f"out={taken}")
    assert proc.returncode == 2 and "out=" in proc.stderr and "overwrite=true" in proc.stderr
    assert (taken / "mine.txt").read_text() == "keep me"
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    before = (checkpoint / "model.safetensors").read_bytes()
    for target in (checkpoint, run_dir, checkpoint / "sub"):
        proc = run_cli("export", f"checkpoint={run_dir}", "format=hf", f"out={target}", "overwrite=true")
        assert proc.returncode == 2 and "export to another folder" in proc.stderr, proc.stderr
    assert (checkpoint / "model.safetensors").read_bytes() == before
    proc = run_cli("export", f"checkpoint={run_dir}", "format=open_clip", f"out={taken}", "overwrite=true", check=True)
    assert sorted(p.name for p in taken.iterdir()) == [
        "export_check.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]  # (replaced whole: the old file is gone)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_unmappable_architecture_is_refused_by_name_leaving_nothing(tmp_path):
    from clipkit.config import RootConfig
    from clipkit.export import ExportError, export
    from clipkit.model import build

    cfg = RootConfig()
    cfg.model.init_logit_bias = -10.0  # a SigLIP head: CLIPModel has no bias
    with pytest.raises(ExportError, match="does not map to transformers' CLIPModel.*logit bias"):
        export(build(cfg.model), cfg, "hf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
