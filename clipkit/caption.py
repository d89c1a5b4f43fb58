"""``clipkit caption``: captions images with a trained CoCa model; also the decoding the captioning eval uses.

Decoding is greedy (the most likely next token until the end-of-text token or the model's context length),
written here over the CoCa's towers and decoder as its ``forward`` chains them (``visual``, ``text``,
``text_decoder``), not through the root ``forward``: under FSDP2 the root's post-forward hook reshards what eval's
``full_params`` unsharded, and the next decoding step fails.

open_clip 3.3's own ``CoCa.generate`` needs ``transformers`` < 4.56 (it imports ``BeamSearchScorer``, which 4.57
and 5.x no longer export) and asserts otherwise. Greedy decoding is deterministic: an exported model gives the
same captions in open_clip (tested with a greedy loop over open_clip's model; with transformers 4.55,
``generate(generation_type="top_k", top_k=1)`` agrees too).
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from clipkit.errors import PATH, ConfigError, require

if TYPE_CHECKING:
    import torch

log = logging.getLogger("clipkit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SOT, EOT = 49406, 49407  # open_clip's SimpleTokenizer's start/end of text


@dataclass
class CaptionConfig:
    # Images to caption: an image file, a folder (its images, by name) or a glob; None = the demo's held-out
    # retrieval images, printed beside their reference captions.
    images: Optional[str] = field(default=None, metadata=PATH)
    # How many images (the first N; 0 = all).
    num: int = 5
    # Longest caption in tokens, start and end included (None: the model's context length).
    max_tokens: Optional[int] = None

    def validate(self, prefix: str = "caption") -> None:
        require(f"{prefix}.num", self.num, self.num >= 0, "must be >= 0 (0 = all)")
        if self.max_tokens is not None:
            require(f"{prefix}.max_tokens", self.max_tokens, self.max_tokens >= 2, "must be >= 2")
        if self.images is not None and not image_files(self.images):
            raise ConfigError(f"{prefix}.images", self.images, f"no image ({', '.join(IMAGE_SUFFIXES)}) found there")


def image_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    found = sorted(path.iterdir()) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(path)))
    return [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def greedy_captions(
    model, images: torch.Tensor, max_tokens: int | None = None, pad_id: int = 0, synchronous: bool = False
) -> torch.Tensor:
    """[N, T] token ids (start token first; after a caption's end token: ``pad_id``), greedy, without autograd.
    ``synchronous``: always ``max_tokens`` steps, not stopping when every caption has ended (several ranks of a
    sharded model must make the same forward calls)."""
    import torch

    max_tokens = min(max_tokens or model.context_length, model.context_length)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, image_embs = model.visual(images)  # (the image tower once: its tokens, which the decoder attends to)
        out = torch.full((images.shape[0], 1), SOT, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        while out.shape[1] < max_tokens and (synchronous or not bool(done.all())):
            _, token_embs = model.text(out)
            nxt = model.text_decoder(image_embs, token_embs)[:, -1].argmax(dim=-1)
            if out.shape[1] == max_tokens - 1:
                nxt = torch.full_like(nxt, EOT)  # the last place ends the caption
            nxt = nxt.masked_fill(done, pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOT
    model.train(was_training)
    return out


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    """The text of each row of ``greedy_captions``: the tokens between the start and the end token."""
    texts = []
    for row in ids.tolist():
        body = row[1:]
        body = body[: body.index(EOT)] if EOT in body else body
        texts.append(" ".join(tokenizer.decode(body).split()))
    return texts


def caption_command(cfg) -> list[dict]:
    """Loads ``checkpoint`` (its ``weights``), captions ``caption.images`` (or the demo's held-out images) and
    prints one line per image; returns the records."""
    import torch

    from clipkit import checkpoint as ckpt
    from clipkit.data import ensure_demo
    from clipkit.eval.runner import eval_transform
    from clipkit.evaluate import load_trained

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
    import io

    from PIL import Image

    from clipkit.data.transforms import to_rgb

    data = record.pop("bytes") if "bytes" in record else Path(record["image"]).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im)


def demo_references(demo_dir: Path, num: int) -> list[dict]:
    """The first ``num`` images of the demo's held-out retrieval split (0 = all), with their reference captions."""
    from clipkit.data import dir_spec
    from clipkit.eval.config import RetrievalConfig
    from clipkit.eval.data import open_source

    source = open_source("retrieval", dir_spec(Path(demo_dir) / "retrieval"), RetrievalConfig(dataset="demo"))
    out = []
    for index, load, captions in source.records():
        if num and len(out) >= num:
            break
        if load is not None and not isinstance(captions, str):
            out.append({"image": f"demo retrieval #{index}", "references": list(captions), "bytes": load()})
    return out
