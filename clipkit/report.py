"""``RUN_DIR/report.html``: one self-contained page per run (plots inline as PNG, no script, no network).

Written by rank 0 at the end of every training run (``logging.report``) and on demand (``clipkit report
RUN_DIR``), from what the run left behind: ``metrics.jsonl`` (training curves and every eval), ``summary.json``
(final eval with its confusion matrix and retrieval examples, data errors, environment) and ``config.yaml``.
Retrieval thumbnails are read back from the eval set itself (the examples store dataset positions, not pixels).
"""

from __future__ import annotations

import html
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch
import yaml

from clipkit.eval.registry import Evaluator, evaluator
from clipkit.figures import png, subplots

log = logging.getLogger("clipkit")

CURVES = [  # (metrics.jsonl key, title)
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("logit_scale", "temperature (logit_scale = 1/T)"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("itm_loss", "ITM term (unweighted; loss.itm_weight)"),  # (curves a run did not log are left out)
    ("itm_accuracy", "ITM head accuracy on its pairs (prior 2/3)"),
]
PACKAGES = ("torch", "open_clip_torch", "webdataset", "deepspeed", "hydra-core", "numpy", "pillow")


def environment(world_size: int, device) -> dict:
    """What the run ran on (stored in summary.json, so a report made elsewhere still shows it)."""
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


def _curve(records: list[dict], key: str, title: str, log_y: bool = False) -> str | None:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not pts:
        return None
    fig, ax = subplots(figsize=(4.6, 2.8))
    ax.plot(*zip(*pts, strict=True), lw=1.4, color="#2563eb")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if log_y:
        ax.set_yscale("log")
    return png(fig, alt=title)


def _throughput(records: list[dict]) -> str | None:
    pts = [(r["step"], r["samples_per_s"], r.get("data_wait_pct") or 0.0) for r in records if "samples_per_s" in r]
    if not pts:
        return None
    steps, speed, wait = zip(*pts, strict=True)
    fig, ax = subplots(figsize=(4.6, 2.8))
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
    return png(fig)


def _eval_curves(records: list[dict]) -> str | None:
    series: dict[str, list] = {}
    for r in records:
        for name, res in (r.get("eval") or {}).items():
            for label, value in _evaluator(res).curves(name, res).items():
                series.setdefault(label, []).append((r["step"], value))
    if not series:
        return None
    fig, ax = subplots(figsize=(4.6, 2.8))
    for label, pts in series.items():
        ax.plot(*zip(*pts, strict=True), marker="o", ms=4, lw=1.4, label=label)
    ax.set_title("eval metrics over steps (%)", fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.set_xlim(0, max(r["step"] for r in records) * 1.03)  # the whole run, also for a single (final) eval
    ax.set_ylim(0, 100)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig)


def _data_errors(summary: dict) -> str:
    errors = summary.get("data_errors") or {}
    if not errors:
        return "<p>No training sample was skipped.</p>"
    fig, ax = subplots(figsize=(4.6, 0.35 * len(errors) + 1))
    ax.barh(list(errors), list(errors.values()), color="#dc2626")
    ax.set_title("skipped training samples by kind (all ranks)", fontsize=10)
    ax.tick_params(labelsize=8)
    by_epoch = summary.get("data_errors_by_epoch") or {}
    table = "".join(
        f"<tr><td>{html.escape(str(e))}</td><td>{html.escape(json.dumps(k))}</td></tr>" for e, k in by_epoch.items()
    )
    return png(fig) + (f"<table><tr><th>epoch</th><th>skipped</th></tr>{table}</table>" if table else "")


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
    run_dir = Path(run_dir)
    records = _records(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    run_config = _parsed(config_text)
    train = [r for r in records if "loss" in r]
    evals = summary.get("eval") or next((r["eval"] for r in reversed(records) if "eval" in r), {})

    cards = []
    for name, res in evals.items():
        cards += _evaluator(res).cards(name, res)
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
        parts += _evaluator(res).report(name, res, run_config)
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


def _evaluator(res: dict) -> Evaluator:
    """The evaluator that wrote a result (a result of an unknown kind gets no figures)."""
    try:
        return evaluator(res.get("task", ""))
    except KeyError:
        return Evaluator()


def _parsed(config_text: str) -> dict:
    try:
        out = yaml.safe_load(config_text) if config_text else {}
    except yaml.YAMLError:
        return {}
    return out if isinstance(out, dict) else {}


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
