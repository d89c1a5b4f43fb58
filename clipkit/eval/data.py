"""Eval datasets: any supported source as an indexed stream, split over ranks and loader workers.

Sources (``classification_source`` / ``retrieval_source`` pick one from the dataset string):
  classification  webdataset shards with a ``cls`` member; an image folder (one sub-folder per class, classes
                  sorted by name); a CSV / parquet table (image path, label as class index or class name)
  retrieval       webdataset shards with a caption list (``json`` ``captions``, or ``txt``); a CSV / parquet
                  table (image path, caption; an image on several rows has several captions); a COCO captions
                  JSON (``images`` + ``annotations``) or a Karpathy-style JSON (``images`` with ``sentences``)
Every record has a global index (its position in the source). With W ranks x K workers, slot s handles the
records whose index % (W*K) == s, so each record is decoded once, by one process, whatever W; the evaluators
gather (index, embedding) pairs and restore the order: results equal one process, with no padding duplicates.
Images go through open_clip's own eval preprocessing (resize the short side, centre crop, normalise). Records
that cannot be used are skipped and counted by kind (``bad_image``, ``no_image``, ``no_label``,
``unknown_label``, ``no_caption``), by the slot that owns them, so counts are independent of W as well.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.data import dir_spec, worker_context
from clipkit.data.loader import worker_init
from clipkit.data.shards import expand_spec, is_shard_spec
from clipkit.data.stream import ShardReadError, iter_shard
from clipkit.data.tables import read_records
from clipkit.data.transforms import to_rgb
from clipkit.errors import UserError

log = logging.getLogger("clipkit")
SHARD_IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
TABLE_EXTS = {".csv", ".tsv", ".parquet"}


class EvalDataError(UserError, ValueError):
    """A dataset that cannot be evaluated at all (as opposed to single records, which are skipped)."""

    kind = "eval error"


# A record: (index, image loader, target) or (index, None, skip kind).
Record = tuple[int, Callable[[], bytes] | None, object]


@dataclass
class Source:
    """An indexed record stream; ``classnames`` are the source's own (image folder) names, if any."""

    records: Callable[[], Iterator[Record]]
    classnames: list[str] | None = None
    description: str = ""


def _file(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _item_records(items: list[tuple[Path, object]]) -> Iterator[Record]:
    """Records of (image file, target) pairs; a target that is a string is a skip kind."""
    for index, (path, target) in enumerate(items):
        yield index, _file(path), target


def _iter_shard_records(spec: str, target: Callable[[dict], object]) -> Iterator[Record]:
    index = 0
    for source in expand_spec(spec, check_exists=True):
        for url in source.urls:
            try:
                for sample in iter_shard(url):
                    data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
                    if data is None:
                        yield index, None, "no_image"
                    else:
                        yield index, (lambda d=data: d), target(sample)
                    index += 1
            except ShardReadError as err:  # (after retries) the rest of the shard is lost, not the eval
                log.warning("eval shard ends early: %s", err)


def _shard_records(spec: str, target: Callable[[dict], object]) -> Callable[[], Iterator[Record]]:
    # partial of module-level functions: a Source travels to fork-server loader workers by pickle
    return partial(_iter_shard_records, spec, target)


def _shard_label(sample: dict) -> object:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return "no_label"


def sample_captions(sample: dict) -> list[str]:
    """All captions of a shard sample: ``json`` ``captions`` list (or ``caption``), else ``txt``."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        caps = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
        if caps:
            return [c for c in caps if isinstance(c, str) and c.strip()]
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace") if isinstance(sample["txt"], bytes) else sample["txt"]
        return [text] if text.strip() else []
    return []


def _shard_captions(sample: dict) -> object:
    return _captions_or_skip(sample_captions(sample))


def _captions_or_skip(caps: list[str]) -> object:
    caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
    return tuple(caps) if caps else "no_caption"


def image_folder(root: Path) -> Source:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise EvalDataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise EvalDataError(f"{root / name}: class folder has no images ({', '.join(sorted(IMAGE_EXTS))})")
        items += [(f, label) for f in files]
    names = [c.replace("_", " ") for c in classes]
    return Source(partial(_item_records, items), names, f"{len(items)} images in {len(classes)} folders")


def match_classnames(
    folder_names: list[str] | None, named: list[str] | None, spec: str | None, verbose: bool = True
) -> list[str]:
    """The class name of each label. An image folder's labels are its sorted sub-folders; a class-name file
    (``spec``) that names the same classes in another order (a dataset's natural order) is matched by name,
    never by position. A file that names something else (wnid folders: n01440764 -> tench) maps by sorted folder
    position, and the first pairs are logged; a file of another length is refused."""
    if named is None:
        return folder_names  # (no file: the folder names themselves)
    if folder_names is None:
        return named
    if len(named) != len(folder_names):
        raise EvalDataError(
            f"{spec} lists {len(named)} class names; the image folder has {len(folder_names)} class sub-folders"
        )

    def key(name: str) -> str:
        return " ".join(name.replace("_", " ").lower().split())

    by_key = {key(n): n for n in named}
    if len(by_key) == len(named) and set(by_key) == {key(f) for f in folder_names}:
        if verbose:
            log.info("class names of %s matched to the image folder's sub-folders by name", spec)
        return [by_key[key(f)] for f in folder_names]
    pairs = ", ".join(f"{f} -> {n}" for f, n in list(zip(folder_names, named, strict=True))[:4])
    if verbose:
        log.warning(
            "class names of %s are not the image folder's sub-folder names: mapped by sorted folder position: %s, ...",
            spec,
            pairs,
        )
    return named


def table_classification(path: Path, image_column: str, label_column: str, classnames: list[str]) -> Source:
    rows = read_records(path, [image_column, label_column])
    by_name = {name: i for i, name in enumerate(classnames)}

    def label(value) -> object:
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            return int(text) if 0 <= int(text) < len(classnames) else "unknown_label"
        return by_name.get(text, "unknown_label")

    items = [(path.parent / str(row[image_column]), label(row[label_column])) for row in rows]
    return Source(partial(_item_records, items), None, f"{len(rows)} rows of {path.name}")


def table_retrieval(path: Path, image_column: str, caption_column: str) -> Source:
    captions: dict[str, list[str]] = collections.OrderedDict()
    for row in read_records(path, [image_column, caption_column]):
        captions.setdefault(str(row[image_column]), []).append(str(row[caption_column] or ""))
    return _grouped(path.parent, list(captions.items()), f"{len(captions)} images of {path.name}")


def json_retrieval(path: Path, image_root: Path | None, split: str | None) -> Source:
    """COCO captions (``images`` [{id, file_name}] + ``annotations`` [{image_id, caption}]) or Karpathy-style
    (``images`` [{filename, [filepath], sentences [{raw}], [split]}]) JSON."""
    meta = json.loads(path.read_text())
    root = image_root or path.parent
    images = meta.get("images") if isinstance(meta, dict) else None
    if not isinstance(images, list):
        raise EvalDataError(f"{path}: expected a COCO or Karpathy-style JSON with an 'images' list")
    if "annotations" in meta:  # COCO
        caps: dict[int, list[str]] = collections.defaultdict(list)
        for ann in meta["annotations"]:
            caps[ann["image_id"]].append(ann.get("caption", ""))
        items = [(img["file_name"], caps.get(img["id"], [])) for img in images]
    else:  # Karpathy / Flickr
        if split and any("split" in img for img in images):
            images = [img for img in images if img.get("split") == split]
        items = [
            (str(Path(img.get("filepath", "")) / img["filename"]), [s.get("raw", "") for s in img.get("sentences", [])])
            for img in images
        ]
    return _grouped(root, items, f"{len(items)} images of {path.name}")


def _grouped(root: Path, items: list[tuple[str, list[str]]], description: str) -> Source:
    pairs = [(root / name, _captions_or_skip(caps)) for name, caps in items]
    return Source(partial(_item_records, pairs), None, description)


def classification_source(dataset: str, cfg, classnames: list[str] | None = None) -> Source:
    """The labelled images behind a dataset string (``eval.zeroshot``): shards with ``cls``, an image folder, a
    table; ``classnames`` (a table's names for its labels) from ``cfg.classnames``."""
    if is_shard_spec(dataset):
        return Source(_shard_records(dataset, _shard_label), None, dataset)
    path = Path(dataset).expanduser()
    if path.is_dir():
        return classification_source(dir_spec(path), cfg, classnames) if _has_tars(path) else image_folder(path)
    if path.suffix in TABLE_EXTS:
        if classnames is None:
            raise EvalDataError(f"{path}: a classification table needs eval.zeroshot.classnames")
        return table_classification(path, cfg.image_column, cfg.label_column, classnames)
    raise EvalDataError(f"{dataset}: not a shard spec, image folder or CSV/parquet table")


def retrieval_source(dataset: str, cfg) -> Source:
    """The captioned images behind a dataset string (``eval.retrieval``): shards with captions, a table, a COCO or
    Karpathy JSON."""
    if is_shard_spec(dataset):
        return Source(_shard_records(dataset, _shard_captions), None, dataset)
    path = Path(dataset).expanduser()
    if path.is_dir():
        if _has_tars(path):
            return retrieval_source(dir_spec(path), cfg)
        raise EvalDataError(f"{path}: a retrieval dataset is shards, a CSV/parquet table or a COCO/Karpathy JSON")
    if path.suffix in TABLE_EXTS:
        return table_retrieval(path, cfg.image_column, cfg.caption_column)
    if path.suffix == ".json":
        return json_retrieval(path, Path(cfg.image_root) if cfg.image_root else None, cfg.split)
    raise EvalDataError(f"{dataset}: not a shard spec, CSV/parquet table or COCO/Karpathy JSON")


def _has_tars(path: Path) -> bool:
    return bool(list(path.glob("*.tar")))


class EvalStream(IterableDataset):
    """This rank's (and this worker's) share of a source, preprocessed; skipped records pass through marked."""

    def __init__(self, source: Source, transform, rank: int, world_size: int):
        self.source, self.transform, self.rank, self.world_size = source, transform, rank, world_size
        self.trainer_pid = os.getpid()  # workers end with this process (clipkit.data.loader.watch_parent)

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        for index, load, target in self.source.records():
            if index % num_slots != slot:
                continue
            if load is None or isinstance(target, str):
                yield {"index": index, "skip": target if isinstance(target, str) else "no_image"}
                continue
            try:
                with Image.open(io.BytesIO(load())) as img:
                    image = self.transform(to_rgb(img))  # (16-bit greys scaled, not clipped)
            except Exception:  # unreadable, truncated or not an image: counted, never fatal
                yield {"index": index, "skip": "bad_image"}
                continue
            yield {"index": index, "image": image, "target": target}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "skip" not in it]
    return {
        "index": [it["index"] for it in good],
        "image": torch.stack([it["image"] for it in good]) if good else None,
        "target": [it["target"] for it in good],
        "skips": [it["skip"] for it in items if "skip" in it],
    }


def loader(source: Source, transform, rank: int, world_size: int, batch_size: int, num_workers: int) -> DataLoader:
    """Workers from the fork server and dying with their parent, as the training loader's (see worker_context)."""
    extra = dict(multiprocessing_context=worker_context(), worker_init_fn=worker_init) if num_workers else {}
    return DataLoader(
        EvalStream(source, transform, rank, world_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),  # an eval never draws from the training's global generator
        **extra,
    )
