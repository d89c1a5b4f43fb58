"""The run report and TensorBoard, from a real run that is stopped and resumed (as users' runs are):

- ``report.html`` is written at the end of training, self-contained (no script, no external reference), with
  the training curves, eval over steps, the confusion matrix and the retrieval examples with thumbnails read
  back from the eval set; ``clipkit report RUN_DIR`` typed in a shell writes the same page again.
- The confusion matrix agrees with the metrics computed independently from the logits (top-1, per-class recall).
- TensorBoard holds exactly the metrics.jsonl curves, one value per step after the resume (events past the
  resumed checkpoint dropped), eval included.
- Where Chromium is installed, the page is rendered headless and the screenshot is checked to show content.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_PROCESS_DATA, SMALL_DEMO, run_cli
from tests.integration.test_typed_in_a_shell import bash

ARGS = [
    *SMALL_DEMO,
    *IN_PROCESS_DATA,
    "train.steps=12",
    "train.global_batch_size=32",
    "train.log_every=2",
    "train.checkpoint_every=6",
    "eval.every=6",
    "logging.progress=false",
    "logging.tensorboard=true",
    "logging.report=true",  # (the default, named: tests.conftest.run_cli turns it off where a run leaves it out)
]


@pytest.fixture(scope="module")
def run(small_demo, tmp_path_factory) -> Path:
    """12 steps with an eval every 6; the last checkpoint is then removed and the run resumed from step 6."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_cli("train", f"hydra.run.dir={run_dir}", *ARGS, check=True)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    (run_dir / "report.html").unlink()
    proc = run_cli("train", f"hydra.run.dir={run_dir}", *ARGS, check=True)
    assert "resumed from" in proc.stderr and f"report: {run_dir / 'report.html'}" in proc.stdout
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_report_is_self_contained_and_complete(run):
    page = (run / "report.html").read_text()
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)  # nothing fetched from anywhere
    for section in ("Training", "Zero-shot classification: zeroshot", "Retrieval examples: retrieval"):
        assert f"<h2>{section}</h2>" in page, section
    for section in ("Data errors", "Environment", "Resolved config"):
        assert f"<h2>{section}</h2>" in page, section
    images = re.findall(r'src="data:image/png;base64,', page)
    summary = json.loads((run / "summary.json").read_text())
    examples = summary["eval"]["retrieval"]["examples"]
    assert len(examples) == 6 and all(len(ex["top"]) == 5 for ex in examples)
    missing = sum(ex["image"] not in ex["top"] for ex in examples)
    # 6 plots (loss, lr, temperature, grad norm, throughput, eval over steps) + the confusion matrix + every
    # thumbnail (5 per query, plus the query's own image when it is not among them)
    assert len(images) == 6 + 1 + 5 * len(examples) + missing
    assert page.count('class="hit"') == len(examples) - missing
    assert "No training sample was skipped." in page
    assert summary["environment"]["versions"]["torch"] in page
    assert "global_batch_size: 32" in page  # the resolved config


def test_confusion_matrix_agrees_with_the_metrics(run):
    zs = json.loads((run / "summary.json").read_text())["eval"]["zeroshot"]
    confusion, names = zs["confusion"], zs["classnames"]
    assert len(names) == 36 and len(confusion) == 36 and all(len(row) == 36 for row in confusion)
    total = sum(map(sum, confusion))
    assert total == zs["num_samples"]
    assert sum(confusion[c][c] for c in range(36)) / total == pytest.approx(zs["acc1"], abs=1e-12)
    for c, name in enumerate(names):
        if sum(confusion[c]):
            assert confusion[c][c] / sum(confusion[c]) == pytest.approx(zs["per_class_recall"][name], abs=1e-12)
    # the report-only parts stay out of the logged records (metrics.jsonl, wandb, TensorBoard)
    logged = [r["eval"] for r in metrics(run) if "eval" in r]
    assert logged and all("confusion" not in e["zeroshot"] and "examples" not in e["retrieval"] for e in logged)


def test_clipkit_report_typed_in_a_shell_writes_the_same_page(run, tmp_path):
    copy = tmp_path / "moved here" / "run"  # a space in the path, as users have
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    proc = bash(f"clipkit report '{copy}'", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "report.html").read_text().replace(str(copy.resolve()), "RUN") == (
        (run / "report.html").read_text().replace(str(run.resolve()), "RUN")
    )
    bad = bash(f"clipkit report '{tmp_path / 'nope'}'", tmp_path)
    assert bad.returncode == 2 and "not a run dir" in bad.stderr


def test_tensorboard_has_the_same_curves_once(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    records = metrics(run)
    for key in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s"):
        events = acc.Scalars(key)
        want = [(r["step"], r[key]) for r in records if key in r]
        assert [e.step for e in events] == [s for s, _ in want], key  # steps 2..12 once each, despite the resume
        assert [e.value for e in events] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert {"eval/zeroshot/acc1", "eval/retrieval/mean_R@1"} <= tags
    assert [e.step for e in acc.Scalars("eval/zeroshot/acc1")] == [6, 12]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt install chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,2200",
            f"--screenshot={shot}",
            (run / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2200)
    # A page that rendered shows text, plots and thumbnails: many distinct colours, and not only near the top.
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500
    lower = img.crop((0, 1100, 1280, 2200)).getcolors(maxcolors=1 << 20)
    assert lower is not None and len(lower) > 100
