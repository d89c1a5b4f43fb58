"""``clipkit export``: a clipkit checkpoint -> artifacts other tools load, each verified by loading it back.

formats
  open_clip  ``open_clip_config.json`` (model_cfg + preprocess_cfg) + ``open_clip_model.safetensors``, loadable
             with ``open_clip.create_model_and_transforms("local-dir:PATH")``.
  hf         a transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``,
             ``preprocessor_config.json``), for a ViT image tower + standard text tower; ``CLIPVisionModel``
             loads its vision part. Other architectures are refused with the reason.
  onnx       ``image_encoder.onnx`` + ``text_encoder.onnx`` (dynamic batch), checked with onnxruntime.
  towers     ``image_encoder/`` and ``text_encoder/``, each loadable alone with ``clipkit.export.load_tower``.
After writing, each export is loaded by its consumer and its embeddings are compared with the checkpoint's on
a fixed batch; the maximum absolute difference is printed and stored in ``export_check.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from clipkit.config import RootConfig
from clipkit.model import Built, model_config, quiet_root_logger

MAX_ABS_DIFF = 1e-4  # fp32 embeddings, before normalisation


class ExportError(ValueError):
    pass


PROBE_CAPTIONS = [f"a photo of thing number {i}" for i in range(4)]


def _probe_inputs(built: Built) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch (4 images, 4 captions) on which an export must reproduce the checkpoint's embeddings."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(PROBE_CAPTIONS), 3, built.image_size, built.image_size, generator=g)
    return images, built.tokenizer(PROBE_CAPTIONS)


@torch.no_grad()
def _reference(built: Built, images, text) -> tuple[torch.Tensor, torch.Tensor]:
    built.model.eval()
    return built.model.encode_image(images), built.model.encode_text(text)


def open_clip_model_cfg(cfg: RootConfig) -> dict:
    model_cfg = dict(model_config(cfg.model))
    for key in ("init_logit_scale", "init_logit_bias"):
        if getattr(cfg.model, key) is not None:
            model_cfg[key] = getattr(cfg.model, key)
    return model_cfg


def write_open_clip_config(built: Built, cfg: RootConfig, out: Path) -> None:
    """``open_clip_config.json``: the model config and the preprocessing (what ``local-dir:`` loading reads)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model_cfg": open_clip_model_cfg(cfg), "preprocess_cfg": dict(built.model.visual.preprocess_cfg)}
    (out / "open_clip_config.json").write_text(json.dumps(meta, indent=1))


def export_open_clip(built: Built, cfg: RootConfig, out: Path) -> dict:
    write_open_clip_config(built, cfg, out)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in built.model.state_dict().items()},
        str(out / "open_clip_model.safetensors"),
    )
    # Verify in the consumer.
    with quiet_root_logger():
        loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    images, text = _probe_inputs(built)
    ref_img, ref_txt = _reference(built, images, text)
    with torch.no_grad():
        tok = open_clip.get_tokenizer(f"local-dir:{out}")
        got_img, got_txt = (
            loaded.encode_image(images),
            loaded.encode_text(tok(PROBE_CAPTIONS)),
        )
    return _check("open_clip", ref_img, ref_txt, got_img, got_txt)


def _check(fmt: str, ref_img, ref_txt, got_img, got_txt) -> dict:
    diff = {
        "image_max_abs_diff": (ref_img - got_img).abs().max().item(),
        "text_max_abs_diff": (ref_txt - got_txt).abs().max().item(),
    }
    if max(diff.values()) > MAX_ABS_DIFF:
        raise ExportError(f"{fmt} export does not reproduce the checkpoint's embeddings: {diff}")
    return {"format": fmt, **diff, "tolerance": MAX_ABS_DIFF}


# --------------------------------------------------------------------------------------- Hugging Face CLIPModel


def _hf_mappable(model: torch.nn.Module, model_cfg: dict) -> None:
    """Raises ExportError unless the model is a ViT + standard text transformer that CLIPModel expresses."""
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

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


def hf_config(model_cfg: dict, quick_gelu: bool):
    from transformers import CLIPConfig

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
        pad_token_id=0,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"])


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


def export_hf(built: Built, cfg: RootConfig, out: Path) -> dict:
    try:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ExportError("format=hf needs transformers: pip install 'clipkit[hf]'") from None
    hf_logging.set_verbosity_error()  # the vision-only load lists the text weights it leaves out: expected
    hf_logging.disable_progress_bar()

    model_cfg = open_clip_model_cfg(cfg)
    _hf_mappable(built.model, model_cfg)
    quick_gelu = bool(model_cfg.get("quick_gelu"))
    config = hf_config(model_cfg, quick_gelu)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(
        hf_state_dict(built.model.state_dict(), model_cfg["text_cfg"]["layers"], model_cfg["vision_cfg"]["layers"]),
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    size = built.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(built.mean),
        image_std=list(built.std),
        resample=3,
    ).save_pretrained(out)
    # Verify in the consumer: the full model and the vision tower alone.
    hf = CLIPModel.from_pretrained(out).eval()
    images, text = _probe_inputs(built)
    ref_img, ref_txt = _reference(built, images, text)
    with torch.no_grad():
        got_img = _tensor(hf.get_image_features(pixel_values=images))
        got_txt = _tensor(hf.get_text_features(input_ids=text))
        vision = CLIPVisionModel.from_pretrained(out).eval()
        pooled = vision(pixel_values=images).pooler_output
    result = _check("hf", ref_img, ref_txt, got_img, got_txt)
    vis_diff = (hf.visual_projection(pooled) - ref_img).abs().max().item()
    if vis_diff > MAX_ABS_DIFF:
        raise ExportError(f"CLIPVisionModel does not reproduce the image tower: max abs diff {vis_diff}")
    result["vision_model_max_abs_diff"] = vis_diff
    return result


def _tensor(x) -> torch.Tensor:
    """transformers returns a tensor or (in newer versions) an output object holding the pooled embeddings."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


# ------------------------------------------------------------------------------------------------------- ONNX


class _Tower(torch.nn.Module):
    """One encoder of the CLIP model as its own module (un-normalised embeddings, like encode_image/encode_text)."""

    def __init__(self, model: torch.nn.Module, which: str):
        super().__init__()
        self.model, self.which = model, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.which == "image" else self.model.encode_text(x)


def export_onnx(built: Built, cfg: RootConfig, out: Path) -> dict:
    """``image_encoder.onnx`` (pixel_values: float N x 3 x S x S, normalised) and ``text_encoder.onnx``
    (input_ids: int64 N x context_length), dynamic batch, plus the open_clip config for preprocessing and the
    tokenizer. Checked with onnxruntime at a batch size other than the one exported."""
    import warnings

    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("format=onnx needs onnx and onnxruntime: pip install 'clipkit[onnx]'") from None
    write_open_clip_config(built, cfg, out)
    built.model.eval()
    images, text = _probe_inputs(built)
    results = {}
    for which, example, name in (("image", images[:2], "pixel_values"), ("text", text[:2], "input_ids")):
        path = out / f"{which}_encoder.onnx"
        with warnings.catch_warnings():  # the TorchScript-based exporter warns about its own deprecation
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Tower(built.model, which),
                (example,),
                str(path),
                input_names=[name],
                output_names=["embeddings"],
                opset_version=17,
                dynamo=False,
                dynamic_axes={name: {0: "batch"}, "embeddings": {0: "batch"}},
            )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probe = images if which == "image" else text  # 4 rows: not the exported batch of 2
        got = torch.from_numpy(session.run(None, {name: probe.numpy()})[0])
        results[which] = got
    ref_img, ref_txt = _reference(built, images, text)
    return _check("onnx", ref_img, ref_txt, results["image"], results["text"])


# ------------------------------------------------------------------------------------------ separate towers

TOWER_FILES = ("tower_config.json", "model.safetensors")


def _tower_state(sd: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """A tower's weights under the tower's own names: ``visual.*``; ``text.*`` (custom-text models, CoCa) or the
    text tower's top-level keys (CLIP). A CoCa's caption decoder belongs to neither."""
    prefix = "visual." if which == "image" else "text." if any(k.startswith("text.") for k in sd) else None
    if prefix:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def load_tower(path: str | Path) -> torch.nn.Module:
    """An exported tower as a standalone open_clip module: ``tower(images)`` or ``tower(token_ids)`` gives the
    un-normalised embeddings (what ``encode_image`` / ``encode_text`` return)."""
    from open_clip.model import _build_text_tower, _build_vision_tower
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "tower_config.json").read_text())
    build = _build_vision_tower if cfg["tower"] == "image" else _build_text_tower
    tower_cfg = cfg["vision_cfg" if cfg["tower"] == "image" else "text_cfg"]
    tower = build(cfg["embed_dim"], tower_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))
    tower.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return tower.eval()


def export_towers(built: Built, cfg: RootConfig, out: Path) -> dict:
    """``image_encoder/`` and ``text_encoder/``, each a config + safetensors loadable on its own (``load_tower``),
    for services that serve one modality; the image config carries the preprocessing, the text one the tokenizer."""
    model_cfg = open_clip_model_cfg(cfg)
    if model_cfg["text_cfg"].get("hf_model_name"):
        raise ExportError("format=towers supports open_clip's built-in text tower only")
    sd = built.model.state_dict()
    pre = dict(built.model.visual.preprocess_cfg)
    for which, sub in (("image", "image_encoder"), ("text", "text_encoder")):
        d = out / sub
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "tower": which,
            "embed_dim": model_cfg["embed_dim"],
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),  # (the *-quickgelu configs: OpenAI's weights)
            "source_model": built.name,
        }
        # (a CoCa tower also returns its token embeddings, for the caption decoder: an encoder export does not)
        if which == "image":
            meta.update(vision_cfg={**model_cfg["vision_cfg"], "output_tokens": False}, preprocess_cfg=pre)
        else:
            meta.update(
                text_cfg={**model_cfg["text_cfg"], "output_tokens": False},
                tokenizer={"open_clip": built.name, "context_length": built.tokenizer.context_length},
            )
        (d / "tower_config.json").write_text(json.dumps(meta, indent=1, default=list))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in _tower_state(sd, which).items()}, str(d / "model.safetensors")
        )
    images, text = _probe_inputs(built)
    built.model.eval()
    with torch.no_grad():  # (un-normalised, as the towers give them; CoCa's encode_* normalise by default)
        ref_img, ref_txt = (
            built.model.encode_image(images, normalize=False),
            built.model.encode_text(text, normalize=False),
        )
        got_img, got_txt = load_tower(out / "image_encoder")(images), load_tower(out / "text_encoder")(text)
    return _check("towers", ref_img, ref_txt, got_img, got_txt)


EXPORTERS = {"open_clip": export_open_clip, "hf": export_hf, "onnx": export_onnx, "towers": export_towers}


def export(built: Built, cfg: RootConfig, fmt: str, out: Path) -> dict:
    result = EXPORTERS[fmt](built, cfg, Path(out))
    (Path(out) / "export_check.json").write_text(json.dumps(result, indent=1))
    return result
