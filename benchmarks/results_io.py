"""What every benchmark script does last: write its results as JSON (creating the folder) and say where."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: str | Path, results: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {out}")
    return out
