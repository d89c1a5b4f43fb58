"""CoCa through the real CLI (model=coca_tiny): the contrastive and the captioning term trained together, by one
process and by FSDP with gradient caching to the same parameters; ``clipkit eval`` adds BLEU-4 / CIDEr;
``clipkit caption`` captions the demo's held-out images or an image folder; the open_clip export loads in
open_clip and, decoded greedily there by a loop written here over open_clip's own model, gives the same captions.

Same data and tolerance as test_engines.py (global batches of 48 of 96 pairs, float32, ATOL 1e-5)."""

from __future__ import annotations

import html
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.integration.test_engines import ATOL, COMMON, MICRO2, logged, torchrun

STEPS = 4
CAPTION_WEIGHT = 1.5
COCA = [  # (after test_engines.COMMON: the last value of a key wins)
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "model=coca_tiny",
    f"loss.caption_weight={CAPTION_WEIGHT}",
    "eval.retrieval.dataset=demo",  # the end-of-run eval captions the 10 held-out images (on every rank)
]


def final(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("coca") / "single"
    run_cli("train", f"hydra.run.dir={run}", *COMMON, *COCA, check=True)
    return run


def test_the_loss_adds_the_captioning_term(single, tmp_path):
    """At step 1 the decoder knows nothing: its term is close to ln(vocabulary) per token, times its weight;
    with loss.caption_weight=0 only the contrastive loss is left, and the decoder gets no update."""
    alone = tmp_path / "no-caption"
    run_cli("train", f"hydra.run.dir={alone}", *COMMON, *COCA, "loss.caption_weight=0", check=True)
    with_caption, contrastive = logged(single, "loss")[0], logged(alone, "loss")[0]
    caption_term = (with_caption - contrastive) / CAPTION_WEIGHT
    assert abs(caption_term - torch.log(torch.tensor(49408.0)).item()) < 1.5, (with_caption, contrastive)
    # without its term the decoder gets no gradient: AdamW's decoupled weight decay alone scales its weights
    start = load_file(str(alone / "checkpoints" / "step_00000002" / "model.safetensors"))[
        "text_decoder.text_projection"
    ]
    end = final(alone)["text_decoder.text_projection"]
    shrink = (end * start).sum() / (start * start).sum()
    assert shrink < 1 and torch.allclose(end, shrink * start, rtol=0, atol=1e-7)
    trained = final(single)["text_decoder.text_projection"]
    assert not torch.allclose(trained, shrink * start, rtol=0, atol=1e-4)


def test_fsdp_with_gradient_caching_trains_the_same_parameters(single, tmp_path):
    other = tmp_path / "fsdp"
    torchrun(other, *COCA, "parallel=fsdp", MICRO2)
    got, ref = final(other), final(single)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
    assert logged(other, "loss") == pytest.approx(logged(single, "loss"), rel=1e-5)
    assert logged(other, "grad_norm") == pytest.approx(logged(single, "grad_norm"), rel=1e-4)
    # the end-of-run eval decoded on both ranks of the sharded model (the same number of steps on each)
    retrieval = json.loads((other / "summary.json").read_text())["eval"]["retrieval"]
    assert retrieval["caption_num_captioned"] == 10 and len(retrieval["caption_examples"]) == 5


@pytest.mark.slow  # (`make test-all`: DeepSpeed starts in ~40 s per run)
@pytest.mark.parametrize("engine, extra", [("zero2", [MICRO2]), ("zero3", [])], ids=["zero2-cache2", "zero3"])
def test_deepspeed_engines_train_the_same_parameters(single, tmp_path, engine, extra):
    other = tmp_path / engine
    torchrun(other, *COCA, f"parallel={engine}", *extra)
    got, ref = final(other), final(single)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
    assert logged(other, "loss") == pytest.approx(logged(single, "loss"), rel=1e-5)


def test_eval_scores_the_captions(single, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("eval", f"checkpoint={single}", f"eval.output={out}", "logging.progress=false", check=True)
    retrieval = json.loads(out.read_text())["eval"]["retrieval"]
    assert retrieval["caption_num_captioned"] == retrieval["num_images"] == 10
    assert 0 <= retrieval["caption_BLEU-4"] <= 1 and retrieval["caption_CIDEr"] >= 0
    assert len(retrieval["caption_examples"]) == 5
    assert "captioning BLEU-4 / CIDEr" in proc.stdout and "caption of image 0" in proc.stdout


def test_the_run_report_shows_the_captions_beside_their_images(single):
    run_cli("report", str(single), check=True)  # (the test runs skip the end-of-run report)
    page = (single / "report.html").read_text()
    captions = page.split("<h2>Captions: retrieval</h2>")[1].split("<h2>")[0]
    summary = json.loads((single / "summary.json").read_text())
    examples = next(r for r in summary["eval"].values() if "caption_examples" in r)["caption_examples"]
    assert captions.count('src="data:image/png;base64,') == len(examples) == 5
    for ex in examples:
        assert html.escape(ex["caption"]) in captions and html.escape(ex["references"][0]) in captions


def _png_folder(path, n: int = 3):
    from PIL import Image

    path.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    for i in range(n):
        Image.new("RGB", (40, 40), colours[i % 4]).save(path / f"img{i}.png")
    return path


def test_caption_verb_and_the_open_clip_export_give_the_same_captions(single, tmp_path):
    import open_clip
    from PIL import Image

    # the demo's held-out images, beside a reference caption each
    proc = run_cli("caption", f"checkpoint={single}", check=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("demo retrieval #") for line in lines), proc.stdout
    assert all("(reference: " in line for line in lines)

    folder = _png_folder(tmp_path / "images")
    proc = run_cli("caption", f"checkpoint={single}", f"caption.images={folder}", check=True)
    ours = dict(line.split("\t") for line in proc.stdout.strip().splitlines())
    assert sorted(ours) == [str(folder / f"img{i}.png") for i in range(3)]

    export = tmp_path / "export"
    run_cli("export", f"checkpoint={single}", "format=open_clip", f"out={export}", check=True)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    for path, caption in ours.items():
        image = preprocess(Image.open(path).convert("RGB"))[None]
        tokens = [sot]
        with torch.no_grad():  # greedy, the whole model each step, as a user would write it against open_clip
            while tokens[-1] != eot and len(tokens) < model.context_length:
                text = torch.tensor([tokens])
                logits = model(image, text, output_labels=False)["logits"][0, -1]
                tokens.append(int(logits.argmax()) if len(tokens) < model.context_length - 1 else eot)
        body = [t for t in tokens[1:] if t != eot]
        assert " ".join(tokenizer.decode(body).split()) == caption, path


def test_encoder_exports_of_a_coca_model(single, tmp_path):
    """``towers`` exports the two encoders (not the decoder), checked by its own reload; ``hf`` is refused with
    the reason (transformers' CLIPModel has no attentional pooler)."""
    proc = run_cli("export", f"checkpoint={single}", "format=towers", f"out={tmp_path / 'towers'}", check=True)
    assert "max abs embedding difference image 0.00e+00, text 0.00e+00" in proc.stdout
    proc = run_cli("export", f"checkpoint={single}", "format=hf", f"out={tmp_path / 'hf'}")
    assert proc.returncode == 1 and "does not map to transformers' CLIPModel" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args, key, says",
    [
        (["train", "loss.caption_weight=1"], "loss.caption_weight", "CoCa"),
        (["train", "loss.contrastive_weight=0"], "loss.contrastive_weight", "only loss"),
        (["train", "model=coca_tiny", "loss.caption_weight=-1"], "loss.caption_weight", ">= 0"),
        (["caption"], "checkpoint", "required"),
        (["caption", "checkpoint=/nowhere"], "checkpoint", "not found"),
        (["caption", "caption.images=/nowhere/*.png"], "caption.images", "no image"),
    ],
)
def test_bad_coca_settings_are_named_before_anything_starts(args, key, says, tmp_path):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and says in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()
