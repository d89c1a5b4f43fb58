"""``clipkit export format=hf``: a complete Hugging Face CLIP folder, verified the way its users load it.

What the folder holds: ``config.json`` + ``model.safetensors`` (transformers' ``CLIPModel``; its vision part also
loads alone as ``CLIPVisionModel``), the tokenizer (open_clip's CLIP BPE as ``vocab.json`` / ``merges.txt`` /
``tokenizer.json``, ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407, ``model_max_length`` = the model's
context length), ``preprocessor_config.json`` and ``processor_config.json`` (``CLIPProcessor``), the
sentence-transformers module list (``modules.json``), and a model card (``README.md``) with the Hub's metadata,
the training data, steps, batch and the checkpoint's eval numbers.

Checked before the folder is kept (``clipkit.export`` writes it under a temporary name first):
- ``CLIPModel`` reproduces the checkpoint's embeddings on open_clip's token ids and pixels (1e-4);
- ``CLIPProcessor``'s own tokenizer gives open_clip's token ids for captions with punctuation, unicode and more
  tokens than the context (equal up to the end-of-text token; after it HF pads with 49407 where open_clip pads
  with 0, which the causal text tower never attends to), and the text embeddings of its ids match (1e-4);
- ``CLIPVisionModel`` reproduces the image embeddings, and its penultimate hidden state (what a LLaVA-style
  projector reads) equals open_clip's tokens after the same block;
- ``SentenceTransformer(folder)`` encodes texts and images to the same embeddings (where sentence-transformers
  is installed).
Architectures that ``CLIPModel`` cannot express (a timm or HF text tower, non-ViT images, attention pooling, a
SigLIP bias) are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer
from PIL import Image
from safetensors.torch import save_file

from clipkit.config import RootConfig
from clipkit.export_check import MAX_ABS_DIFF, ExportError, check, open_clip_model_cfg, probe_inputs, reference
from clipkit.model import Built

# Captions the tokenizer check runs: punctuation, unicode (accents, CJK, emoji, superscripts), case and
# whitespace, contractions, URLs, and one longer than any context (truncated by both tokenizers the same way).
TOKENIZER_PROBE = [
    "a photo of a cat.",
    "Hello, World!!! It's 3:45pm -- ok?",
    "café naïve résumé",
    "日本語のキャプション",
    "emoji 🐱🚀 test",
    "  Multiple   spaces\tand\nnewlines ",
    "UPPER lower MiXeD",
    "don't won't can't we'll",
    "#hashtag @user https://example.com/a?b=c",
    "x² + y² = z²",
    "a very long caption that goes on and on " * 8,
]
ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.CLIPModel"}]


def _hf_mappable(model: torch.nn.Module, model_cfg: dict) -> None:
    """Raises ExportError unless the model is a ViT + standard text transformer that CLIPModel expresses."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    problems = []
    if type(model) is not CLIP:
        problems.append(f"model class {type(model).__name__} (needs open_clip CLIP with its built-in text tower)")
    if not isinstance(getattr(model, "visual", None), VisionTransformer):
        problems.append(f"image tower {type(getattr(model, 'visual', None)).__name__} (needs a ViT)")
    else:
        vis = model.visual
        if vis.pool_type != "tok" or vis.attn_pool is not None or vis.final_ln_after_pool:
            problems.append("vision pooling other than the class token")
        if v.get("ls_init_value") or v.get("no_ln_pre") or v.get("pos_embed_type", "learnable") != "learnable":
            problems.append("layer scale / no pre-LN / non-learnable position embedding in the ViT")
    if getattr(model, "text_pool_type", "argmax") != "argmax" or t.get("embed_cls") or t.get("proj_bias"):
        problems.append("text pooling other than at the end-of-text token")
    if t.get("hf_model_name") or t.get("hf_tokenizer_name"):
        problems.append("a Hugging Face text tower")
    if getattr(model, "logit_bias", None) is not None:
        problems.append("a SigLIP logit bias (CLIPModel has none)")
    if problems:
        raise ExportError("this architecture does not map to transformers' CLIPModel: " + "; ".join(problems))


def transformers():
    """The ``transformers`` package (the ``hf`` extra: optional, and ~2 s to import, so imported only when an hf
    export runs), its logging quiet: the vision-only load lists the text weights it leaves out, as expected."""
    try:
        import transformers as hf
    except ImportError:
        raise ExportError("format=hf needs transformers: pip install 'clipkit[hf]'") from None
    hf.logging.set_verbosity_error()
    hf.logging.disable_progress_bar()
    return hf


def hf_config(model_cfg: dict, quick_gelu: bool):
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = dict(
        hidden_size=v["width"],
        intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v.get("head_width", 64),
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=model_cfg["embed_dim"],
    )
    text = dict(
        vocab_size=t.get("vocab_size", 49408),
        hidden_size=t["width"],
        intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        max_position_embeddings=t.get("context_length", 77),
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=model_cfg["embed_dim"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return transformers().CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"])


def hf_state_dict(sd: dict[str, torch.Tensor], num_text_layers: int, num_vision_layers: int) -> dict:
    """open_clip CLIP parameter names -> transformers CLIPModel names (q/k/v split, projections transposed)."""
    out = {
        "logit_scale": sd["logit_scale"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
    }
    for src, dst, n in (
        ("transformer", "text_model", num_text_layers),
        ("visual.transformer", "vision_model", num_vision_layers),
    ):
        for i in range(n):
            a, b = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            for name, w in zip("qkv", sd[a + "attn.in_proj_weight"].chunk(3), strict=True):
                out[f"{b}self_attn.{name}_proj.weight"] = w
            for name, w in zip("qkv", sd[a + "attn.in_proj_bias"].chunk(3), strict=True):
                out[f"{b}self_attn.{name}_proj.bias"] = w
            pairs = (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            )
            for x, y in pairs:
                out[f"{b}{y}.weight"], out[f"{b}{y}.bias"] = sd[f"{a}{x}.weight"], sd[f"{a}{x}.bias"]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def write_tokenizer(out: Path, context_length: int):
    """open_clip's CLIP BPE as a transformers tokenizer (``tokenizer.json`` and its config, plus the
    ``vocab.json`` / ``merges.txt`` pair older loaders read). Returns the tokenizer."""
    simple = SimpleTokenizer()
    # (open_clip names its special tokens <start_of_text>/<end_of_text>; OpenAI's files and transformers use these)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    tokenizer = transformers().CLIPTokenizer(
        vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=context_length
    )
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return tokenizer


def export_hf(built: Built, cfg: RootConfig, out: Path, source: Path | None = None) -> dict:
    hf = transformers()

    model_cfg = open_clip_model_cfg(cfg)
    _hf_mappable(built.model, model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(model_cfg, bool(model_cfg.get("quick_gelu"))).save_pretrained(out)
    save_file(
        hf_state_dict(built.model.state_dict(), model_cfg["text_cfg"]["layers"], model_cfg["vision_cfg"]["layers"]),
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    size = built.image_size
    image_processor = hf.CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(built.mean),
        image_std=list(built.std),
        resample=3,  # bicubic, as open_clip's eval transform
    )
    image_processor.save_pretrained(out)  # preprocessor_config.json (CLIPImageProcessor alone, older loaders)
    tokenizer = write_tokenizer(out, built.context_length)
    hf.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / "modules.json").write_text(json.dumps(ST_MODULES, indent=1))

    images, text = probe_inputs(built)
    result = check("hf", *reference(built, images, text), *hf_features(out, images, text))
    result.update(check_tokenizer(built, out))
    result.update(check_vision_model(built, out))
    result.update(check_sentence_transformers(built, out))
    (out / "README.md").write_text(model_card(built, cfg, source, result))
    return result


def _pooled(x) -> torch.Tensor:
    """transformers returns a tensor or (in newer versions) an output object holding the pooled embeddings."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


@torch.no_grad()
def hf_features(out: Path, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hf = transformers().CLIPModel.from_pretrained(out).eval()
    return _pooled(hf.get_image_features(pixel_values=images)), _pooled(hf.get_text_features(input_ids=text))


@torch.no_grad()
def check_tokenizer(built: Built, out: Path) -> dict:
    """The folder's own tokenizer, loaded as users load it (``CLIPProcessor``), against open_clip's."""
    hf_lib = transformers()
    processor = hf_lib.CLIPProcessor.from_pretrained(out)
    ctx = built.context_length
    ours = built.tokenizer(TOKENIZER_PROBE)
    theirs = processor(text=TOKENIZER_PROBE, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
    theirs = theirs["input_ids"]
    eot = 49407
    for caption, a, b in zip(TOKENIZER_PROBE, ours, theirs, strict=True):
        end = int((a == eot).nonzero()[0]) + 1
        if not torch.equal(a[:end], b[:end]) or not (b[end:] == eot).all():
            raise ExportError(f"the exported tokenizer gives {b.tolist()} for {caption!r}; open_clip {a.tolist()}")
    built.model.eval()
    hf = hf_lib.CLIPModel.from_pretrained(out).eval()
    diff = (_pooled(hf.get_text_features(input_ids=theirs)) - built.model.encode_text(ours)).abs().max().item()
    if diff > MAX_ABS_DIFF:
        raise ExportError(f"text embeddings of the exported tokenizer's ids differ by {diff}")
    return {"tokenizer_captions": len(TOKENIZER_PROBE), "tokenizer_text_max_abs_diff": diff}


@torch.no_grad()
def check_vision_model(built: Built, out: Path) -> dict:
    """``CLIPVisionModel`` alone: its pooled output projects to the image embeddings, and its penultimate hidden
    state (a LLaVA-style projector's input) equals open_clip's tokens after the same block."""
    hf = transformers()
    images, _ = probe_inputs(built)
    vision = hf.CLIPVisionModel.from_pretrained(out).eval()
    states = vision(pixel_values=images, output_hidden_states=True)
    projection = hf.CLIPModel.from_pretrained(out).eval().visual_projection
    built.model.eval()
    pooled_diff = (projection(states.pooler_output) - built.model.encode_image(images)).abs().max().item()
    seen = {}
    blocks = built.model.visual.transformer.resblocks
    handle = blocks[-2].register_forward_hook(lambda module, args, output: seen.update(tokens=output))
    try:
        built.model.encode_image(images)
    finally:
        handle.remove()
    tokens = seen["tokens"] if built.model.visual.transformer.batch_first else seen["tokens"].transpose(0, 1)
    layer_diff = (states.hidden_states[-2] - tokens).abs().max().item()
    if max(pooled_diff, layer_diff) > MAX_ABS_DIFF:
        raise ExportError(f"CLIPVisionModel differs from the image tower: pooled {pooled_diff}, layer {layer_diff}")
    return {"vision_model_max_abs_diff": pooled_diff, "penultimate_layer_max_abs_diff": layer_diff}


@torch.no_grad()
def check_sentence_transformers(built: Built, out: Path) -> dict:
    """``SentenceTransformer(folder)`` embeds texts and images as the model does (skipped without the package)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return {"sentence_transformers": "not installed: not checked"}
    model = SentenceTransformer(str(out), device="cpu")
    rng = np.random.default_rng(0)
    size = built.image_size
    pictures = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    captions = ["a red circle", "two blue stars on a dark background"]
    got_txt = torch.as_tensor(model.encode(captions, convert_to_numpy=True))
    got_img = torch.as_tensor(model.encode(pictures, convert_to_numpy=True))
    # The reference: the same images through the exported processor's pixels, the captions through open_clip.
    pixels = transformers().CLIPImageProcessor.from_pretrained(out)(images=pictures, return_tensors="pt")[
        "pixel_values"
    ]
    built.model.eval()
    ref_img, ref_txt = built.model.encode_image(pixels), built.model.encode_text(built.tokenizer(captions))
    diff = max((got_img - ref_img).abs().max().item(), (got_txt - ref_txt).abs().max().item())
    if diff > MAX_ABS_DIFF:
        raise ExportError(f"SentenceTransformer({out.name}) embeddings differ from the model's by {diff}")
    return {"sentence_transformers_max_abs_diff": diff}


def _eval_at(source: Path | None, step: int | None) -> dict:
    """The eval numbers of the checkpoint's step, from its run's metrics.jsonl or summary.json (else empty)."""
    if source is None or step is None:
        return {}
    run_dir = source.parent.parent
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in reversed(metrics.read_text().splitlines()):
            record = json.loads(line)
            if record.get("step") == step and "eval" in record:
                return record["eval"]
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("step") == step:
            return data.get("eval", {})
    return {}


def model_card(built: Built, cfg: RootConfig, source: Path | None, checks: dict) -> str:
    """README.md: the Hub's metadata, what was trained on what, the checkpoint's eval numbers, how to load it."""
    trainer = (
        json.loads((source / "trainer.json").read_text()) if source and (source / "trainer.json").is_file() else {}
    )
    step = trainer.get("step")
    evals = _eval_at(source, step)
    v, t = built.model.visual, built.model
    width, layers = v.transformer.width, len(v.transformer.resblocks)
    patches = (built.image_size // v.patch_size[0]) ** 2 if isinstance(v.patch_size, tuple) else None
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        "tags:",
        "- clip",
        "- clipkit",
        "- open_clip",
        "- sentence-transformers",
        "---",
        "",
        f"# {built.name}, trained with clipkit",
        "",
        f"A CLIP dual encoder ({built.name}: ViT image tower, {layers} blocks of width {width}, {built.image_size} px; "
        f"text tower of {len(t.transformer.resblocks)} blocks, context {built.context_length} tokens), exported "
        "by `clipkit export format=hf` and checked in transformers' `CLIPModel`, `CLIPProcessor`, "
        "`CLIPVisionModel` and sentence-transformers.",
        "",
        "## Training",
        "",
        f"- data: `{cfg.data.train}`" + (" (clipkit's embedded demo data)" if cfg.data.train == "demo" else ""),
        f"- steps: {step if step is not None else 'unknown'}; global batch {cfg.train.global_batch_size}; "
        f"samples seen {trainer.get('samples_seen', 'unknown')}; seed {cfg.train.seed}",
        f"- loss: {cfg.loss.name}; optimizer AdamW, lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}",
        f"- checkpoint: `{source}`" if source else "- checkpoint: (built in Python, not a training run)",
        "",
        "## Evaluation of this checkpoint",
        "",
    ]
    if evals:
        lines += ["| eval | metric | value |", "|---|---|---:|"]
        for name, metrics in evals.items():
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    lines.append(f"| {name} | {key} | {value:.4g} |")
    else:
        lines.append("No eval was logged at this checkpoint's step (`clipkit eval checkpoint=...` computes one).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import CLIPModel, CLIPProcessor, pipeline",
        "model, processor = CLIPModel.from_pretrained(PATH), CLIPProcessor.from_pretrained(PATH)",
        'inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt", padding=True)',
        "classify = pipeline('zero-shot-image-classification', model=PATH)",
        "",
        "from sentence_transformers import SentenceTransformer",
        "embeddings = SentenceTransformer(PATH).encode([image, 'a photo of a cat'])",
        "```",
        "",
        "## Tokenizer",
        "",
        f"open_clip's CLIP BPE (49,408 tokens; `<|startoftext|>` 49406, `<|endoftext|>` 49407), `model_max_length` "
        f"{built.context_length}. Its ids equal open_clip's up to the end-of-text token; after it transformers pads "
        "with 49407 where open_clip pads with 0, which the causal text tower never attends to (same embeddings). "
        f"Text longer than {built.context_length} tokens needs `truncation=True` (in a pipeline: "
        "`tokenizer_kwargs={'truncation': True}`). open_clip also repairs text before tokenising (ftfy, HTML "
        "entities such as `&amp;`, curly quotes); transformers' tokenizer does not, so clean such text first.",
        "",
        "## Vision tower for multimodal LLMs",
        "",
        "`CLIPVisionModel.from_pretrained(PATH)` loads the image tower alone. A LLaVA-style projector reads the "
        "penultimate layer's patch features, `outputs.hidden_states[-2][:, 1:]` with `output_hidden_states=True` "
        f"({patches} patches of width {width} at {built.image_size} px), as LLaVA does for OpenAI's CLIP; checked "
        "equal to open_clip's tokens after the same block.",
        "",
        "## Export check",
        "",
        "```json",
        json.dumps(checks, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)
