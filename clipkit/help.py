"""``clipkit VERB --help``: the verb's overrides with their defaults and one line each, read from the typed
config itself (the dataclass fields and the comment above each field), so the help cannot drift from the code.

A field's line is the comment block directly above it in its dataclass (or the comment at the end of its line),
joined into one line and cut at the end of its first sentence when long; ``Choice`` fields list their allowed
values. Nested configs are walked recursively (``data.demo.num_train``). Hydra presets (config groups) come
from ``conf/``.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import re
import textwrap
from functools import cache
from pathlib import Path

# One line per verb: the verb list of `clipkit --help` and the head of `clipkit VERB --help`.
VERB_LINES = {
    "train": "train (no overrides: the tiny model on the embedded demo data, a few minutes on a CPU)",
    "eval": "zero-shot classification / retrieval of checkpoint=PATH (a run dir or a checkpoint dir)",
    "export": (
        "checkpoint=PATH format=open_clip|hf|onnx|towers out=DIR: encoder artifacts, verified by loading them back"
    ),
    "caption": "checkpoint=PATH [caption.images=FILE|DIR|GLOB]: captions from a trained CoCa model (greedy)",
    "embed": "checkpoint=PATH data.train=SHARDS out=DIR: image/text embeddings in clip-retrieval's layout (embed.*)",
    "shards": "write webdataset shards from local images + captions: clipkit shards INPUT OUTPUT [--help]",
    "bench": "samples/s, MFU, data-wait, peak memory of clipkit's training step vs open_clip's (model=..., bench.*)",
    "report": "RUN_DIR: write RUN_DIR/report.html (curves, eval, confusion, retrieval examples; also after each run)",
}

# Which parts of the root config each verb reads (the rest is accepted but has no effect on it).
VERB_SECTIONS = {
    "train": ["name", "model", "data", "loss", "distill", "optim", "train", "eval", "logging", "parallel"],
    "eval": ["checkpoint", "eval", "model", "data.cache_dir", "data.demo", "train.device", "logging.progress"],
    "export": ["checkpoint", "format", "out", "overwrite", "weights"],
    "embed": ["checkpoint", "out", "weights", "embed", "data.train", "data.caption_key", "data.num_workers"],
    "caption": ["checkpoint", "caption", "weights"],
    "bench": [
        "bench",
        "model",
        "loss",
        "train.global_batch_size",
        "train.micro_batch_size",
        "train.precision",
        "train.device",
        "train.seed",
        "data.train",
        "logging.peak_tflops",
    ],
}
MAX_DOC = 110


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment as one line} for a dataclass, from its source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    docs = {}
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        above, i = [], stmt.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        line = lines[stmt.lineno - 1]
        inline = line.split("#", 1)[1].strip() if "#" in line and not line.strip().startswith("#") else ""
        docs[stmt.target.id] = " ".join(above) or inline
    return docs


def _one_line(doc: str) -> str:
    """The comment, or its first sentence when it is long (a sentence ends at a full stop before a capital)."""
    doc = doc.replace("``", "`")
    end = re.search(r"[.;] (?=[A-Z])", doc)
    return doc[: end.start() + 1] if len(doc) > MAX_DOC and end else doc


def _show(value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):  # (as the override is typed: model.lora.targets=[attn,mlp])
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value) if value != "" else "''"


def options(config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, one-line doc) of every leaf field of ``config`` (a dataclass instance: the composed
    config, so the values are what the command would run with)."""
    out = []
    docs = field_docs(type(config))
    for f in dataclasses.fields(config):
        key = f"{prefix}{f.name}"
        default = getattr(config, f.name)
        if dataclasses.is_dataclass(default):
            out += options(default, key + ".")
            continue
        doc = _one_line(docs.get(f.name, ""))
        if isinstance(default, enum.Enum):
            doc = f"[{'|'.join(m.value for m in type(default))}] {doc}".rstrip()
        out.append((key, _show(default), doc))
    return out


def presets(conf: Path) -> dict[str, list[str]]:
    """Hydra config groups shipped in ``conf/``: {group: [preset names]}."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf.iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


def verb_help(verb: str, conf: Path, config) -> str:
    """The help of ``verb``; ``config`` is the composed ``RootConfig`` (with any overrides given before
    ``--help``, so ``clipkit train model=vit_b32 --help`` shows that preset's values)."""
    wanted = VERB_SECTIONS[verb]
    rows = [r for r in options(config) if any(r[0] == w or r[0].startswith(w + ".") for w in wanted)]
    width = min(max(len(f"{k}={v}") for k, v, _ in rows), 46)
    out = [f"usage: clipkit {verb} [key=value ...] [--cfg] [--help]", "", VERB_LINES[verb], ""]
    groups = presets(conf)
    shown = [g for g in groups if g in {w.split(".")[0] for w in wanted}]
    if shown:
        out.append("presets (Hydra groups, e.g. model=vit_b32):")
        out += [f"  {g}={'|'.join(groups[g])}" for g in shown]
        out.append("")
    out.append("overrides (key=default  what it does):")
    for key, default, doc in rows:
        left = f"{key}={default}"
        out.append(f"  {left:<{width}}  {doc}".rstrip() if len(left) <= width else f"  {left}\n  {'':<{width}}  {doc}")
    out += [
        "",
        "  hydra.run.dir=DIR  the run directory (default runs/${name}); re-running a command resumes its run",
        "  --cfg              print the resolved config and exit",
    ]
    return "\n".join(out) + "\n"
