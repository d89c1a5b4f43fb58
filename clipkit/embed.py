"""``clipkit embed``: embeddings of a webdataset at scale, in the layout clip-retrieval and autofaiss read.

    clipkit embed checkpoint=RUN data.train='/data/{00000..09999}.tar' out=DIR [embed.* ...]

Output (``out``)::

    img_emb/img_emb_N.npy        normalised image embeddings of part N (float16 by default), one row per sample
    text_emb/text_emb_N.npy      the same for the captions
    metadata/metadata_N.parquet  key, caption, url (img2dataset's json, else empty), shard, clip_score, row order
    filtered/keys_N.txt          (embed.filter_threshold) the keys whose image-text similarity passes
    image.index, text.index      (embed.index) faiss inner-product indexes over every part, in part order
    embed.json                   what was embedded with what (a resume must match it); summary.json at the end

Part N is the samples of shards ``[N * embed.shards_per_part, (N + 1) * embed.shards_per_part)`` of the spec, in
tar order. A part's files are written under temporary names and renamed into place, metadata last: a part is
done exactly when its metadata file exists. A killed run resumes at the parts not yet done (no sample embedded
twice or missed); under torchrun / SLURM rank r takes parts r, r + W, ...; the loader workers of a rank share
its parts the same way. Images go through the model's own eval preprocessing (resize, centre crop); a list of
captions gives one per sample, seeded by its key. A sample without an image or a caption the embedding needs is
skipped and counted per kind in ``summary.json``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit import checkpoint as ckpt
from clipkit import distributed, faults
from clipkit.config import RootConfig
from clipkit.data import ensure_demo, train_spec, worker_context
from clipkit.data.loader import BadSample, SampleDecoder, resolve_shards, worker_init
from clipkit.data.stream import ShardReadError, iter_shard
from clipkit.data.transforms import to_rgb
from clipkit.errors import UserError
from clipkit.eval.embedding import eval_transform
from clipkit.evaluate import load_trained

log = logging.getLogger("clipkit")
MODALITIES = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}


class EmbedError(UserError, RuntimeError):
    pass


class PartStream(IterableDataset):
    """Decoded batches of the parts this rank embeds; each DataLoader worker takes every W-th of them and yields
    a part's batches in order, the last one flagged (a part with no good sample still yields one, empty)."""

    kind = "embed error"

    def __init__(self, parts: dict[int, list[tuple[str, str]]], decoder: SampleDecoder, transform, tokenizer, cfg):
        self.parts, self.decoder, self.transform, self.tokenizer = parts, decoder, transform, tokenizer
        self.batch_size, self.images, self.texts = cfg.embed.batch_size, cfg.embed.images, cfg.embed.texts
        self.trainer_pid = os.getpid()  # (worker_init: the workers end with this process)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, part in enumerate(sorted(self.parts)):
            if i % workers == worker:
                yield from self._part(part)

    def _part(self, part: int):
        rows, bad = [], Counter()
        for url, name in self.parts[part]:
            try:
                for sample in iter_shard(url):
                    row = self._decode(sample, name)
                    if isinstance(row, str):
                        bad[row] += 1
                        continue
                    rows.append(row)
                    if len(rows) == self.batch_size:
                        yield self._batch(part, rows, bad, last=False)
                        rows, bad = [], Counter()
            except ShardReadError as err:
                log.warning("shard failed, its samples are not embedded: %s", err)
                bad["missing_shard"] += 1
        yield self._batch(part, rows, bad, last=True)

    def _decode(self, sample: dict, shard: str) -> dict | str:
        key = sample["__key__"]
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = {}
        try:
            caption = self.decoder.caption(sample, random.Random(f"{shard}/{key}"))
        except BadSample as bad:
            if self.texts:
                return bad.kind
            caption = ""
        row = {"key": key, "caption": caption, "url": str(meta.get("url") or ""), "shard": shard}
        if self.images:
            data = next((sample[k] for k in self.decoder.image_keys if k in sample), None)
            if data is None:
                return "no_image"
            try:
                with Image.open(io.BytesIO(data)) as im:
                    row["image"] = self.transform(to_rgb(im))
            except Exception:
                return "bad_image"
        return row

    def _batch(self, part: int, rows: list[dict], bad: Counter, last: bool) -> dict:
        batch = {
            "part": part,
            "last": last,
            "bad": dict(bad),
            "rows": [{k: r[k] for k in ("key", "caption", "url", "shard")} for r in rows],
        }
        if self.images and rows:
            batch["image"] = torch.stack([r["image"] for r in rows])
        if self.texts and rows:
            batch["text"] = self.tokenizer([r["caption"] for r in rows])
        return batch


def plan_parts(urls: list[str], names: list[str], per_part: int) -> dict[int, list[tuple[str, str]]]:
    """Part N -> the (url, name) of its shards, in spec order."""
    return {
        n: list(zip(urls[i : i + per_part], names[i : i + per_part], strict=True))
        for n, i in enumerate(range(0, len(urls), per_part))
    }


def part_done(out: Path, part: int) -> bool:
    return (out / "metadata" / f"metadata_{part}.parquet").is_file()


def _atomic(path: Path, write) -> None:
    """Writes ``path`` through ``write(tmp_path)`` and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_part(out: Path, part: int, emb: dict[str, np.ndarray], rows: list[dict], cfg) -> int:
    """Part ``part``'s files, metadata last (its existence marks the part done). Returns the filter's count."""
    for modality, array in emb.items():
        folder, stem = MODALITIES[modality]
        _atomic(out / folder / f"{stem}_{part}.npy", lambda tmp, a=array: np.save(open(tmp, "wb"), a))
    table = {k: [r[k] for r in rows] for k in ("key", "caption", "url", "shard")}
    if "image" in emb and "text" in emb:
        scores = (emb["image"].astype(np.float32) * emb["text"].astype(np.float32)).sum(1)
        table["clip_score"] = scores.tolist()
    passed = 0
    if cfg.embed.filter_threshold is not None:
        keys = [k for k, s in zip(table["key"], table["clip_score"], strict=True) if s >= cfg.embed.filter_threshold]
        passed = len(keys)
        _atomic(
            out / "filtered" / f"keys_{part}.txt", lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keys))
        )
    _atomic(out / "metadata" / f"metadata_{part}.parquet", lambda tmp: pq.write_table(pa.table(table), tmp))
    return passed


def check_or_write_manifest(out: Path, manifest: dict, is_main: bool) -> None:
    """``embed.json``: a resume must embed the same shards with the same model and settings."""
    path = out / "embed.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != manifest:
            diff = sorted(k for k in manifest if saved.get(k) != manifest[k])
            raise EmbedError(f"{out} holds embeddings of another run (differs in {', '.join(diff)}); use a new out=")
    elif any(out.iterdir()) if out.is_dir() else False:
        raise EmbedError(f"{out} is not empty and holds no clipkit embeddings (embed.json); use a new out=")
    elif is_main:
        _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def build_index(out: Path, modality: str, num_parts: int) -> Path:
    try:
        import faiss
    except ImportError:
        raise EmbedError("embed.index=true needs faiss: pip install faiss-cpu") from None
    folder, stem = MODALITIES[modality]
    arrays = [np.load(out / folder / f"{stem}_{n}.npy") for n in range(num_parts)]
    data = np.concatenate([a for a in arrays if len(a)]).astype(np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    path = out / f"{'image' if modality == 'image' else 'text'}.index"
    _atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))
    return path


@torch.no_grad()
def embed_command(cfg: RootConfig) -> dict:
    env = distributed.init(cfg.train.device, cfg.parallel.timeout_s, cfg.train.tf32)
    source = ckpt.resolve(Path(cfg.checkpoint))
    built, _ = load_trained(source, env.device, weights=cfg.weights)
    built.model.eval()
    demo = ensure_demo(cfg.data, say=lambda m: log.info(m)) if cfg.data.train == "demo" else None
    shards, _ = resolve_shards(train_spec(cfg.data, demo), cfg.data.allow_pipe, cfg.data.allow_missing_shards)
    parts = plan_parts(list(shards.urls), list(shards.names), cfg.embed.shards_per_part)
    out = Path(cfg.out).expanduser()
    manifest = {
        "checkpoint": str(source),
        "weights": str(cfg.weights),
        "data": train_spec(cfg.data, demo),
        "num_shards": len(shards),
        "shards_per_part": cfg.embed.shards_per_part,
        "embed": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg.embed).items()},
        "model": built.name,
    }
    if env.is_main:
        check_or_write_manifest(out, manifest, True)
    distributed.barrier()
    check_or_write_manifest(out, manifest, False)
    mine = {n: p for n, p in parts.items() if n % env.world_size == env.rank and not part_done(out, n)}
    log.info("%d of %d parts to embed on rank %d (%d already done)", len(mine), len(parts), env.rank,
             sum(part_done(out, n) for n in parts))  # fmt: skip
    decoder = SampleDecoder(tuple(cfg.data.image_key.split(";")), cfg.data.caption_key, built.image_size, (1.0, 1.0), 0)
    stream = PartStream(mine, decoder, eval_transform(built.model), built.tokenizer, cfg)
    workers = min(cfg.data.workers(), len(mine))
    extra = dict(multiprocessing_context=worker_context(), worker_init_fn=worker_init) if workers else {}
    loader = DataLoader(stream, batch_size=None, num_workers=workers, **extra)
    dtype = np.dtype(cfg.embed.dtype.value)
    dim = built.model.encode_text(built.tokenizer(["x"]).to(env.device)).shape[-1]  # (a part may be empty)
    pending: dict[int, dict] = {}
    counts: Counter = Counter()
    t0, samples = None, 0
    for batch in loader:
        t0 = t0 or time.perf_counter()  # (from the first batch: the workers' start-up is not throughput)
        acc = pending.setdefault(batch["part"], {"rows": [], "image": [], "text": []})
        acc["rows"] += batch["rows"]
        counts.update(batch["bad"])
        for modality in ("image", "text"):
            if modality in batch:
                x = batch[modality].to(env.device, non_blocking=True)
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
                    emb = built.model.encode_image(x) if modality == "image" else built.model.encode_text(x)
                acc[modality].append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy().astype(dtype))
        samples += len(batch["rows"])
        if batch["last"]:
            done = pending.pop(batch["part"])
            emb = {}
            for modality, wanted in (("image", cfg.embed.images), ("text", cfg.embed.texts)):
                if wanted:
                    emb[modality] = np.concatenate(done[modality]) if done[modality] else np.zeros((0, dim), dtype)
            counts["filter_passed"] += write_part(out, batch["part"], emb, done["rows"], cfg)
            counts["parts"] += 1
            faults.at("embed_part", batch["part"] + 1)  # (the reliability hook: kill after part N is written)
    seconds = time.perf_counter() - t0 if t0 else 0.0
    counts["samples"] = samples
    all_counts = distributed.gather_to_main(dict(counts))
    distributed.barrier()
    summary = {}
    if env.is_main:
        total = Counter()
        for c in all_counts:
            total.update(c)
        missing = [n for n in parts if not part_done(out, n)]
        if missing:
            raise EmbedError(f"parts {missing[:5]} were not written; run the same command again to finish them")
        indexes = {}
        if cfg.embed.index:
            for modality, wanted in (("image", cfg.embed.images), ("text", cfg.embed.texts)):
                if wanted:
                    indexes[modality] = str(build_index(out, modality, len(parts)))
        summary = {"parts": len(parts), "this_run": dict(total), "seconds": seconds, "indexes": indexes}
        summary["samples_per_s_rank0"] = samples / seconds if seconds > 0 else None
        _atomic(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
        skipped = {k: v for k, v in total.items() if k not in ("samples", "parts", "filter_passed")}
        print(f"embedded {total['samples']} samples in {total['parts']} parts this run ({len(parts)} in all) into {out}"
              + (f"; skipped {skipped}" if skipped else ""), flush=True)  # fmt: skip
    distributed.destroy()
    return summary
