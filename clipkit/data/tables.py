"""Reading CSV / TSV / parquet tables of image paths and captions or labels (shard writer and eval datasets)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_records(path: Path, columns: list[str]) -> list[dict]:
    """The rows of ``path`` as dicts; raises ``ValueError`` naming the file when a column is missing.
    Parquet needs pandas + pyarrow (not clipkit dependencies)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pandas and pyarrow (pip install pandas pyarrow)") from None
        records = pd.read_parquet(path, columns=columns).to_dict("records")
    else:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if records and any(c not in records[0] for c in columns):
        raise ValueError(f"{path} needs columns {', '.join(map(repr, columns))}; found {sorted(records[0])}")
    return records
