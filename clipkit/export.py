"""``clipkit export``: a clipkit checkpoint -> artifacts other tools load, each verified by loading it back.

formats
  open_clip  ``open_clip_config.json`` (model_cfg + preprocess_cfg) + ``open_clip_model.safetensors``, loadable
             with ``open_clip.create_model_and_transforms("local-dir:PATH")``.
  hf         a complete Hugging Face CLIP folder (model, tokenizer, processor, sentence-transformers modules,
             model card) for a ViT image tower + standard text tower: ``clipkit/export_hf.py``. Other
             architectures are refused with the reason.
  onnx       ``image_encoder.onnx`` + ``text_encoder.onnx`` (dynamic batch), checked with onnxruntime.
  towers     ``image_encoder/`` and ``text_encoder/``, each loadable alone with ``clipkit.export.load_tower``.
After writing, each export is loaded by its consumer and its embeddings are compared with the checkpoint's on
a fixed batch; the maximum absolute difference is printed and stored in ``export_check.json``. The folder is
written under a temporary name beside ``out`` and takes its place only once it has passed that check: an error
leaves nothing half-written, and ``overwrite=true`` replaces an existing folder whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_text_tower, _build_vision_tower
from safetensors.torch import load_file, save_file

from clipkit import itm
from clipkit.checkpoint import resolve
from clipkit.config import RootConfig
from clipkit.evaluate import load_trained
from clipkit.export_check import PROBE_CAPTIONS, ExportError, check, open_clip_model_cfg, probe_inputs, reference
from clipkit.export_hf import export_hf
from clipkit.model import Built, quiet_root_logger

__all__ = ["ExportError", "export", "load_tower"]


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
    images, text = probe_inputs(built)
    ref_img, ref_txt = reference(built, images, text)
    with torch.no_grad():
        tok = open_clip.get_tokenizer(f"local-dir:{out}")
        got_img, got_txt = (
            loaded.encode_image(images),
            loaded.encode_text(tok(PROBE_CAPTIONS)),
        )
    return check("open_clip", ref_img, ref_txt, got_img, got_txt)


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
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("format=onnx needs onnx and onnxruntime: pip install 'clipkit[onnx]'") from None
    write_open_clip_config(built, cfg, out)
    built.model.eval()
    images, text = probe_inputs(built)
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
    ref_img, ref_txt = reference(built, images, text)
    return check("onnx", ref_img, ref_txt, results["image"], results["text"])


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
    images, text = probe_inputs(built)
    built.model.eval()
    with torch.no_grad():  # (un-normalised, as the towers give them; CoCa's encode_* normalise by default)
        ref_img, ref_txt = (
            built.model.encode_image(images, normalize=False),
            built.model.encode_text(text, normalize=False),
        )
        got_img, got_txt = load_tower(out / "image_encoder")(images), load_tower(out / "text_encoder")(text)
    return check("towers", ref_img, ref_txt, got_img, got_txt)


EXPORTERS = {"open_clip": export_open_clip, "hf": export_hf, "onnx": export_onnx, "towers": export_towers}


def export(
    built: Built, cfg: RootConfig, fmt: str, out: Path, source: Path | None = None, overwrite: bool = False
) -> dict:
    """Writes ``fmt`` for ``built`` (trained by ``cfg``, from checkpoint ``source``) to ``out``: under a temporary
    name first, verified in its consumer, then moved into place (an existing ``out`` only with ``overwrite``,
    replaced whole). An ITM head is not exported (it is taken off ``built.model``): the consumers load the two
    encoders as they are."""
    itm.detach(built.model)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty (overwrite=true replaces it whole)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        kwargs = {"source": source} if fmt == "hf" else {}
        result = EXPORTERS[fmt](built, cfg, tmp, **kwargs)
        (tmp / "export_check.json").write_text(json.dumps(result, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def export_command(cfg: RootConfig) -> None:
    """``clipkit export``: the newest complete checkpoint of ``checkpoint`` (or that checkpoint) as ``format`` in
    ``out``, loaded back by its consumer; prints what it wrote and how closely the consumer agrees."""
    path = resolve(Path(cfg.checkpoint))
    built, saved_cfg = load_trained(path, torch.device("cpu"), weights=cfg.weights)
    result = export(built, saved_cfg, cfg.format, Path(cfg.out), source=path, overwrite=cfg.overwrite)
    print(
        f"exported {path} ({cfg.weights} weights) as {cfg.format} to {cfg.out}; reloaded by its consumer, "
        "max abs embedding difference "
        f"image {result['image_max_abs_diff']:.2e}, text {result['text_max_abs_diff']:.2e}"
    )
