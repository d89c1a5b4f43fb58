"""``RUN_DIR/report.html``: one self-contained page per run (plots inline as PNG, no script, no network).

Written by rank 0 at the end of every training run (``logging.report``) and on demand (``clipkit report
RUN_DIR``), from what the run left behind: ``metrics.jsonl`` (training curves and every eval), ``summary.json``
(final eval with its confusion matrix and retrieval examples, data errors, environment) and ``config.yaml``.
Retrieval thumbnails are read back from the eval set itself (the examples store dataset positions, not pixels).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

log = logging.getLogger("clipkit")

THUMB = 72  # px, retrieval thumbnails
MAX_SCAN = 50_000  # eval records read at most to find the thumbnails of the examples
CURVES = [  # (metrics.jsonl key, title)
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("logit_scale", "temperature (logit_scale = 1/T)"),
    ("grad_norm", "gradient norm (before clipping)"),
]
PACKAGES = ("torch", "open_clip_torch", "webdataset", "deepspeed", "hydra-core", "numpy", "pillow")


def _plain(label: str) -> str:
    """A label matplotlib draws as typed: ``$`` would start TeX-like math text (``$x$``, or an error)."""
    return str(label).replace("$", r"\$")


def environment(world_size: int, device) -> dict:
    """What the run ran on (stored in summary.json, so a report made elsewhere still shows it)."""
    import torch

    versions = {}
    for name in ("clipkit", *PACKAGES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda"
        else [platform.processor() or platform.machine()]
    )
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "device": device.type,
        "devices": devices,
        "world_size": world_size,
        "versions": versions,
    }


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _curve(records: list[dict], key: str, title: str, log_y: bool = False) -> str | None:
    import matplotlib.pyplot as plt

    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    ax.plot(*zip(*pts, strict=True), lw=1.4, color="#2563eb")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if log_y:
        ax.set_yscale("log")
    return _png(fig)


def _throughput(records: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    pts = [(r["step"], r["samples_per_s"], r.get("data_wait_pct") or 0.0) for r in records if "samples_per_s" in r]
    if not pts:
        return None
    steps, speed, wait = zip(*pts, strict=True)
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    ax.plot(steps, speed, lw=1.4, color="#2563eb", label="samples/s")
    ax.set_ylabel("samples/s", fontsize=8, color="#2563eb")
    ax2 = ax.twinx()
    ax2.plot(steps, wait, lw=1.0, color="#dc2626", label="data wait %")
    ax2.set_ylabel("data wait (% of step)", fontsize=8, color="#dc2626")
    ax2.set_ylim(0, max(5.0, max(wait) * 1.2))
    ax.set_title("throughput and data wait", fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    for a in (ax, ax2):
        a.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _eval_curves(records: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in records:
        for name, res in (r.get("eval") or {}).items():
            if res.get("task") == "zeroshot":
                series.setdefault(f"{name} top-1", []).append((r["step"], 100 * res["acc1"]))
                series.setdefault(f"{name} top-5", []).append((r["step"], 100 * res["acc5"]))
            elif res.get("task") == "retrieval":
                series.setdefault(f"{name} mean R@1", []).append((r["step"], 100 * res["mean_R@1"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    for label, pts in series.items():
        ax.plot(*zip(*pts, strict=True), marker="o", ms=4, lw=1.4, label=label)
    ax.set_title("eval metrics over steps (%)", fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.set_xlim(0, max(r["step"] for r in records) * 1.03)  # the whole run, also for a single (final) eval
    ax.set_ylim(0, 100)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _confusion(res: dict) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    names, counts = [_plain(n) for n in res["classnames"]], np.array(res["confusion"], dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.19 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("predicted class", fontsize=8)
    ax.set_ylabel("true class", fontsize=8)
    ax.set_title("zero-shot confusion (rows: fraction of each true class)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def _recall_bars(res: dict, n: int = 20) -> str:
    import matplotlib.pyplot as plt

    items = sorted(res["per_class_recall"].items(), key=lambda kv: kv[1])
    shown = items if len(items) <= 2 * n else items[:n] + items[-n:]
    fig, ax = plt.subplots(figsize=(6, 0.18 * len(shown) + 1))
    ax.barh(range(len(shown)), [100 * v for _, v in shown], color="#2563eb")
    ax.set_yticks(range(len(shown)), [_plain(k) for k, _ in shown], fontsize=6)
    ax.set_xlim(0, 100)
    what = "per-class recall (%)" if len(items) == len(shown) else f"per-class recall (%): worst and best {n}"
    ax.set_title(what, fontsize=10)
    ax.tick_params(labelsize=7)
    return _png(fig)


def _data_errors(summary: dict) -> str:
    import matplotlib.pyplot as plt

    errors = summary.get("data_errors") or {}
    if not errors:
        return "<p>No training sample was skipped.</p>"
    fig, ax = plt.subplots(figsize=(4.6, 0.35 * len(errors) + 1))
    ax.barh(list(errors), list(errors.values()), color="#dc2626")
    ax.set_title("skipped training samples by kind (all ranks)", fontsize=10)
    ax.tick_params(labelsize=8)
    by_epoch = summary.get("data_errors_by_epoch") or {}
    table = "".join(
        f"<tr><td>{html.escape(str(e))}</td><td>{html.escape(json.dumps(k))}</td></tr>" for e, k in by_epoch.items()
    )
    return _png(fig) + (f"<table><tr><th>epoch</th><th>skipped</th></tr>{table}</table>" if table else "")


def _thumbnails(res: dict, retrieval_cfg) -> dict[int, str]:
    """{dataset position: data URI} of every image the examples show, read back from the eval set."""
    from dataclasses import replace

    from PIL import Image

    from clipkit.eval.data import open_source

    wanted = {i for ex in res.get("examples", []) for i in (ex["image"], *ex["top"])}
    wanted |= {ex["image"] for ex in res.get("caption_examples", [])}
    if not wanted:
        return {}
    source = open_source("retrieval", res["dataset"], replace(retrieval_cfg, dataset=res["dataset"]))
    out = {}
    for index, load, _ in source.records():
        if index >= MAX_SCAN or len(out) == len(wanted):
            break
        if index in wanted and load is not None:
            try:
                img = Image.open(io.BytesIO(load())).convert("RGB")
            except Exception:
                continue
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out[index] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


def _read_thumbnails(res: dict, retrieval_cfg) -> dict[int, str]:
    try:
        return _thumbnails(res, retrieval_cfg)
    except Exception as err:  # the eval set moved or is remote and unreachable: the ranks still tell
        log.warning("report: retrieval thumbnails unavailable (%s)", err)
        return {}


def _captions(res: dict, thumbs: dict[int, str]) -> str:
    """A CoCa model's greedy captions of the first held-out images, beside their reference captions."""
    rows = []
    for ex in res["caption_examples"]:
        i = ex["image"]
        img = f'<img alt="image {i}" src="{thumbs[i]}">' if i in thumbs else f"<span>#{i}</span>"
        refs = "<br>".join(html.escape(r) for r in ex["references"])
        rows.append(f"<tr><td>{img}</td><th>{html.escape(ex['caption'])}</th><td><small>{refs}</small></td></tr>")
    return (
        f"<p>BLEU-4 {100 * res['caption_BLEU-4']:.1f}, CIDEr {100 * res['caption_CIDEr']:.1f} over "
        f"{res['caption_num_captioned']} images. The model's greedy caption, then the image's reference captions:</p>"
        f'<table class="examples"><tr><td></td><td>caption</td><td>references</td></tr>{"".join(rows)}</table>'
    )


def _examples(res: dict, thumbs: dict[int, str]) -> str:
    rows = []
    for ex in res.get("examples", []):
        cells = []
        for i in ex["top"]:
            mark = "hit" if i == ex["image"] else ""
            img = f'<img alt="image {i}" src="{thumbs[i]}">' if i in thumbs else f"<span>#{i}</span>"
            cells.append(f'<td class="{mark}">{img}</td>')
        own = ""
        if ex["image"] not in ex["top"]:
            i = ex["image"]
            img = f'<img alt="image {i}" src="{thumbs[i]}">' if i in thumbs else f"<span>#{i}</span>"
            own = f'<td class="gap">…</td><td class="own">{img}<br><small>its image</small></td>'
        rows.append(f"<tr><th>{html.escape(ex['caption'])}</th>{''.join(cells)}{own}</tr>")
    return (
        "<p>Caption queries (text to image): the five best-scoring images, left to right; the caption's own "
        'image has a <span class="hitlabel">green frame</span> (shown at the end when it is not among them).</p>'
        f'<table class="examples">{"".join(rows)}</table>'
    )


def _kv_table(items: dict) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
        + "</table>"
    )


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#111827;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}
h2{font-size:17px;border-bottom:1px solid #e5e7eb;padding-bottom:4px;margin-top:28px}
.sub{color:#6b7280;font-size:13px} .cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:130px}
.card b{display:block;font-size:24px} .card span{color:#6b7280;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:8px} .grid img{max-width:100%}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;text-align:left;vertical-align:middle}
.examples th{max-width:260px;font-weight:normal} .examples td img{width:72px;height:72px;border:3px solid #fff}
.examples td.hit img,.examples td.own img{border-color:#16a34a} .hitlabel{color:#16a34a;font-weight:bold}
pre{background:#f9fafb;border:1px solid #e5e7eb;padding:10px;font-size:12px;overflow:auto;max-height:480px}
"""


def write_report(run_dir: Path) -> Path:
    """Writes ``run_dir/report.html`` and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from clipkit.eval.config import RetrievalConfig

    run_dir = Path(run_dir)
    records = _records(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    retrieval_cfg = _retrieval_cfg(config_text) or RetrievalConfig()
    train = [r for r in records if "loss" in r]
    evals = summary.get("eval") or next((r["eval"] for r in reversed(records) if "eval" in r), {})

    cards = []
    for name, res in evals.items():
        if res.get("task") == "zeroshot":
            cards += [(f"{100 * res['acc1']:.1f}%", f"{name} top-1 ({res['num_classes']} classes)")]
            cards += [(f"{100 * res['acc5']:.1f}%", f"{name} top-5")]
        elif res.get("task") == "retrieval":
            cards += [(f"{100 * res['image_to_text_R@1']:.1f}%", f"{name} image→text R@1")]
            cards += [(f"{100 * res['text_to_image_R@1']:.1f}%", f"{name} text→image R@1")]
    if summary:
        cards += [(f"{summary.get('step', 0)}", "steps"), (f"{summary.get('train_time_s', 0):.0f} s", "training time")]
    if train and "samples_per_s" in train[-1]:
        cards += [(f"{train[-1]['samples_per_s']:.0f}", "samples/s (last)")]

    plots = [_curve(train, key, title, log_y=key == "grad_norm") for key, title in CURVES]
    plots += [_throughput(train), _eval_curves(records)]
    parts = [
        f"<h1>clipkit run: {html.escape(run_dir.name)}</h1>",
        f'<div class="sub">{html.escape(str(run_dir.resolve()))}</div>',
        '<div class="cards">'
        + "".join(f"<div class='card'><b>{v}</b><span>{html.escape(k)}</span></div>" for v, k in cards)
        + "</div>",
        "<h2>Training</h2>",
        '<div class="grid">' + "".join(p for p in plots if p) + "</div>",
    ]
    for name, res in evals.items():
        if res.get("task") == "zeroshot":
            parts.append(f"<h2>Zero-shot classification: {html.escape(name)}</h2>")
            parts.append(f'<div class="sub">{html.escape(str(res.get("dataset", "")))}</div>')
            parts.append(_confusion(res) if res.get("confusion") else _recall_bars(res))
        elif res.get("task") == "retrieval":
            parts.append(f"<h2>Retrieval examples: {html.escape(name)}</h2>")
            parts.append(f'<div class="sub">{html.escape(str(res.get("dataset", "")))}</div>')
            thumbs = _read_thumbnails(res, retrieval_cfg)
            parts.append(_examples(res, thumbs))
            if res.get("caption_examples"):
                parts.append(f"<h2>Captions: {html.escape(name)}</h2>")
                parts.append(_captions(res, thumbs))
    parts += ["<h2>Data errors</h2>", _data_errors(summary)]
    env = summary.get("environment")
    if env:
        flat = {k: v for k, v in env.items() if k != "versions"}
        flat.update({f"{k} version": v for k, v in env.get("versions", {}).items()})
        parts += ["<h2>Environment</h2>", _kv_table(flat)]
    parts += ["<h2>Resolved config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>clipkit report: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def _retrieval_cfg(config_text: str):
    """The run's ``eval.retrieval`` settings (columns, image root), for reading the thumbnails back."""
    if not config_text:
        return None
    try:
        import yaml

        from clipkit.eval.config import RetrievalConfig

        section = (yaml.safe_load(config_text).get("eval") or {}).get("retrieval") or {}
        names = RetrievalConfig.__dataclass_fields__
        return RetrievalConfig(**{k: v for k, v in section.items() if k in names})
    except Exception:
        return None


def main(argv: list[str]) -> int:
    """``clipkit report RUN_DIR``."""
    asked = bool(argv) and argv[0] in ("-h", "--help")
    if asked or len(argv) != 1:
        print(
            "usage: clipkit report RUN_DIR\n\nwrite RUN_DIR/report.html (training curves, eval metrics, confusion "
            "matrix, retrieval examples, data errors, config, environment) from what the run left in RUN_DIR",
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else 2
    run_dir = Path(argv[0]).expanduser()
    if not (run_dir / "metrics.jsonl").exists() and not (run_dir / "summary.json").exists():
        print(
            f"clipkit: report error: {run_dir} has no metrics.jsonl or summary.json (not a run dir?)", file=sys.stderr
        )
        return 2
    try:
        print(f"wrote {write_report(run_dir)}")
    except ValueError as err:  # a truncated or hand-edited summary.json / metrics.jsonl
        print(f"clipkit: report error: {run_dir}: a run file is not valid JSON ({err})", file=sys.stderr)
        return 1
    return 0
