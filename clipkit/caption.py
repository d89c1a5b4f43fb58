"""``clipkit caption``: captions images with a trained CoCa model (greedy decoding, ``eval.captioning``)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from PIL import Image

from clipkit import checkpoint as ckpt
from clipkit.config import image_files
from clipkit.data import dir_spec, ensure_demo
from clipkit.data.transforms import to_rgb
from clipkit.eval.captioning import decode, greedy_captions
from clipkit.eval.config import RetrievalConfig
from clipkit.eval.data import retrieval_source
from clipkit.eval.embedding import eval_transform
from clipkit.evaluate import load_trained

log = logging.getLogger("clipkit")


def caption_command(cfg) -> list[dict]:
    """Loads ``checkpoint`` (its ``weights``), captions ``caption.images`` (or the demo's held-out images) and
    prints one line per image; returns the records."""
    path = ckpt.resolve(Path(cfg.checkpoint))
    built, saved = load_trained(path, torch.device("cpu"), weights=cfg.weights)
    transform = eval_transform(built.model)
    c = cfg.caption
    if c.images is None:
        demo = ensure_demo(saved.data, say=log.info)
        records = demo_references(demo, c.num)
    else:
        files = image_files(c.images)
        records = [{"image": str(p), "references": []} for p in (files[: c.num] if c.num else files)]
    readable = []
    for r in records:  # an unreadable image is reported and skipped; the others are captioned
        try:
            r["pixels"] = transform(_load(r))
            readable.append(r)
        except Exception as err:
            log.warning("skipped %s: not a readable image (%s)", r["image"], type(err).__name__)
    records = readable
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        images = torch.stack([r.pop("pixels") for r in chunk])
        texts = decode(built.tokenizer, greedy_captions(built.model, images, c.max_tokens))
        for r, text in zip(chunk, texts, strict=True):
            r["caption"] = text
    for r in records:
        line = f"{r['image']}\t{r['caption']}"
        if r["references"]:
            line += f"\t(reference: {r['references'][0]})"
        print(line, flush=True)
    return records


def _load(record: dict):
    data = record.pop("bytes") if "bytes" in record else Path(record["image"]).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im)


def demo_references(demo_dir: Path, num: int) -> list[dict]:
    """The first ``num`` images of the demo's held-out retrieval split (0 = all), with their reference captions."""
    source = retrieval_source(dir_spec(Path(demo_dir) / "retrieval"), RetrievalConfig(dataset="demo"))
    out = []
    for index, load, captions in source.records():
        if num and len(out) >= num:
            break
        if load is not None and not isinstance(captions, str):
            out.append({"image": f"demo retrieval #{index}", "references": list(captions), "bytes": load()})
    return out
