"""Eval datasets read in a fixed order: webdataset shards with a class (``cls``) or caption members."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipkit.data import transforms
from clipkit.data.shards import expand_spec
from clipkit.data.stream import iter_shard

IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")


@dataclass
class EvalSkips:
    """Samples an evaluator could not use, by kind (reported with the metrics, never silent)."""

    counts: dict = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def iter_samples(spec: str) -> Iterator[dict]:
    for source in expand_spec(spec, check_exists=True):
        for url in source.urls:
            yield from iter_shard(url, handler=lambda exn: True)


def _image(sample: dict, size: int, skips: EvalSkips) -> torch.Tensor | None:
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        skips.add("no_image")
        return None
    try:
        return transforms.eval_image(data, size)
    except Exception:
        skips.add("bad_image")
        return None


def classification_batches(
    spec: str, size: int, batch_size: int, skips: EvalSkips, label_key: str = "cls"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, int64 labels) batches."""
    images, labels = [], []
    for sample in iter_samples(spec):
        if label_key not in sample:
            skips.add("no_label")
            continue
        image = _image(sample, size, skips)
        if image is None:
            continue
        images.append(image)
        labels.append(int(sample[label_key]))
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def sample_captions(sample: dict) -> list[str]:
    """All captions of a sample: ``json`` ``captions`` list (or ``caption``), else ``txt``."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        caps = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
        if caps:
            return [c for c in caps if isinstance(c, str) and c.strip()]
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace") if isinstance(sample["txt"], bytes) else sample["txt"]
        return [text] if text.strip() else []
    return []


def retrieval_batches(
    spec: str, size: int, batch_size: int, skips: EvalSkips
) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
    """(uint8 images, per-image caption lists) batches; images without a caption are skipped and counted."""
    images, captions = [], []
    for sample in iter_samples(spec):
        caps = sample_captions(sample)
        if not caps:
            skips.add("no_caption")
            continue
        image = _image(sample, size, skips)
        if image is None:
            continue
        images.append(image)
        captions.append(caps)
        if len(images) == batch_size:
            yield torch.stack(images), captions
            images, captions = [], []
    if images:
        yield torch.stack(images), captions


def read_lines(path: str | Path) -> list[str]:
    return [ln.strip() for ln in Path(path).expanduser().read_text().splitlines() if ln.strip()]
