"""The doc test: every ``clipkit ...`` line of the ``bash`` blocks of the README and of every page in ``docs/`` runs
through a real shell (``bash -c``), the README first, then the pages in the order the README first links
them, in one sandbox folder holding what the commands name (``photos/``; ``shards/`` and ``runs/`` are made by the
README's own commands). Commands that would train or benchmark for minutes get
small-run overrides appended (the same command with fewer steps and the small demo data), so the README can
never again document a command that fails as typed. The ``clipkit`` bash finds first on PATH hands the command as
the shell expanded it to the tests' fork server (``tests/prefork.py``: ``python -m clipkit ARGS`` minus ~4 s of
imports per command); the installed console script itself is what test_help and test_typed_in_a_shell run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from clipkit.data.shards import expand_spec
from tests import prefork
from tests.conftest import IN_PROCESS_DATA, SMALL_DEMO
from tests.shardsets import COLOURS, jpeg

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SMALL_RUN = [*SMALL_DEMO, "train.steps=3", "train.global_batch_size=32", "logging.progress=false"]
EXTRA = {  # verb -> overrides appended to keep the run small
    "train": SMALL_RUN,
    "eval": ["logging.progress=false"],
    "bench": ["train.global_batch_size=4", "bench.steps=1", "bench.warmup=1"],
}


def pages() -> list[Path]:
    """The README, then the docs pages in the order it first links them."""
    linked = re.findall(r"\]\((docs/[\w-]+\.md)\)", README.read_text())
    return [README, *(ROOT / p for p in dict.fromkeys(linked))]


def readme_commands() -> list[str]:
    blocks = [b for page in pages() for b in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    lines = [ln.strip() for block in blocks for ln in block.splitlines()]
    return [re.sub(r"\s+#\s.*$", "", ln) for ln in lines if ln.startswith("clipkit ")]


def test_every_docs_page_is_linked_and_every_link_resolves():
    on_disk = sorted(p.relative_to(ROOT) for p in (ROOT / "docs").glob("*.md"))
    assert sorted(p.relative_to(ROOT) for p in pages()[1:]) == on_disk  # no page a reader cannot reach
    for page in pages():
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to a missing {target}"
    assert len(README.read_text().splitlines()) <= 250  # a manual's front page; topics live in docs/


def test_readme_commands_run_as_typed(small_demo, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(80):
        name = list(COLOURS)[i % 4]
        (photos / f"p{i:03d}.{'png' if i % 5 == 0 else 'jpg'}").write_bytes(jpeg(COLOURS[name], seed=i))
        (photos / f"p{i:03d}.txt").write_text(f"a {name} square")
    commands = readme_commands()
    assert len(commands) >= 8, commands
    server = prefork.client()
    path = [str(server.shim())] if server else []  # (CLIPKIT_TEST_PREFORK=0: the installed one)
    path += [str(Path(sys.executable).parent), os.environ["PATH"]]
    # TORCH_COMPILE_DISABLE (torch's own switch): `train.compile=step` runs its path (config check, CompiledStep,
    # the traceable update) without inductor, which took ~95 s for the demo's step with an empty cache. Inductor
    # itself is tested against eager in tests/unit/test_gpu_paths.py, and through the CLI on 2 DDP ranks in
    # tests/integration/test_engines.py (make test-all).
    env = {**os.environ, "PATH": ":".join(path), "PYTHONUNBUFFERED": "1", "TORCH_COMPILE_DISABLE": "1"}
    seen = set()
    for command in commands:
        verb = command.split()[1]
        # The first train, eval and embed keep their loader workers and the first train its report (read by
        # `clipkit report runs/demo`); later ones read their data in-process (~4 s less each: a worker pool's
        # start; the samples are the same, docs/data.md) and later trains skip the end-of-run report (~1.5 s).
        later = IN_PROCESS_DATA if verb in seen and verb in ("train", "eval", "embed") else []
        later += ["logging.report=false"] if verb in seen and verb == "train" else []
        seen.add(verb)
        line = " ".join([command, *EXTRA.get(verb, []), *later])
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README command failed: {line}\n{proc.stderr[-3000:]}"
    # The unquoted brace pattern trained on all four shards (the shell expanded it; clipkit joined it back).
    saved = (tmp_path / "runs" / "mine2" / "config.yaml").read_text()
    spec = re.search(r"^  train: (.*)$", saved, flags=re.M)[1].strip("'\"")
    assert len(expand_spec(spec)[0].urls) == 4, spec
