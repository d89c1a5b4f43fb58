"""Writing webdataset tar shards in the img2dataset layout (``KEY.jpg``, ``KEY.txt``, ``KEY.json``, ...).

Shards are written under a temporary name and renamed into place, with a fixed mtime and owner so that the
same samples always give the same bytes. ``sizes.json`` beside the shards maps shard name -> sample count;
the loader reads it to plan the epoch without opening a single tar.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from clipkit.data.shards import SIZES_FILE


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Writes ``samples`` (dicts of ``__key__`` + ``ext -> bytes|str``) to one tar; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    with open(tmp, "wb") as stream:
        # USTAR with an integer mtime: no PAX headers (a float mtime costs 1 KiB per member) and stable bytes.
        writer = wds.TarWriter(
            stream, mtime=0, user="clipkit", group="clipkit", encoder=False, format=tarfile.USTAR_FORMAT
        )
        for sample in samples:
            writer.write(
                {k: (v.encode() if isinstance(v, str) else v) for k, v in sample.items() if k != "__key__"}
                | {"__key__": sample["__key__"]}
            )
            count += 1
        writer.close()
    os.replace(tmp, path)
    return count


def write_sizes_file(shard_dir: Path, sizes: dict[str, int]) -> Path:
    """Writes (or merges into) ``sizes.json`` in ``shard_dir``."""
    path = Path(shard_dir) / SIZES_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(sizes)
    tmp = path.with_name(f".{SIZES_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    os.replace(tmp, path)
    return path
