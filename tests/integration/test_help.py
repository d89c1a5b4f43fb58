"""Help where users look for it, typed in a shell: ``clipkit`` alone lists the verbs, ``clipkit VERB --help``
lists that verb's overrides with the values the command would run with and one line each, taken from the typed
config (the comment above each dataclass field), so a field added without a comment fails here."""

from __future__ import annotations

import re

import pytest

from clipkit.cli import VERBS, compose
from clipkit.help import VERB_SECTIONS, options
from tests.integration.test_typed_in_a_shell import bash


def rows(out: str) -> dict[str, tuple[str, str]]:
    """{key: (value, doc)} of the override lines of a help text; a long ``key=value`` has its doc on the next
    line (indented past the key column)."""
    found, lines = {}, out.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^  ([a-z_][\w.]*)=(\S*)\s*(.*)$", line)
        if m:
            doc = m[3] or (lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("    ") else "")
            found[m[1]] = (m[2], doc)
    return found


def test_every_config_field_has_a_one_line_doc():
    cfg, _ = compose([])
    undocumented = [key for key, _, doc in options(cfg) if not re.sub(r"^\[[^\]]*\]", "", doc).strip()]
    assert not undocumented, f"fields without a comment above them: {undocumented}"


def test_clipkit_alone_lists_the_verbs(tmp_path):
    proc = bash("clipkit", tmp_path, installed=True)
    assert proc.returncode == 2  # no verb: usage, as for any missing argument
    for verb in VERBS:
        assert re.search(rf"^  {verb}\s+\S", proc.stdout, flags=re.M), (verb, proc.stdout)


@pytest.mark.parametrize("verb", sorted(VERB_SECTIONS))
def test_verb_help_lists_its_overrides_with_their_values(verb, tmp_path):
    proc = bash(f"clipkit {verb} --help", tmp_path, installed=True)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    shown = rows(proc.stdout)
    cfg, _ = compose([])
    want = {k: v for k, v, _ in options(cfg) if any(k == s or k.startswith(s + ".") for s in VERB_SECTIONS[verb])}
    assert want.keys() <= shown.keys(), sorted(want.keys() - shown.keys())
    for key, value in want.items():
        assert shown[key][0] == value and shown[key][1], (key, shown[key])
    if verb == "train":  # the composed values (the demo experiment's), the presets, the choices
        assert shown["train.steps"][0] == str(cfg.train.steps)
        assert "model=coca_tiny|small|tiny|vit_b16|vit_b32|vit_l14|vit_s32" in proc.stdout
        assert shown["train.precision"][1].startswith("[auto|fp32|bf16|fp16]")


def test_help_shows_the_values_of_the_overrides_given_before_it(tmp_path):
    proc = bash(
        "clipkit train model=vit_b32 'data.train=/d/{000..009}.tar' train.steps=5 --help", tmp_path, installed=True
    )
    assert proc.returncode == 0, proc.stderr
    shown = rows(proc.stdout)
    assert shown["model.name"][0] == "ViT-B-32" and shown["train.steps"][0] == "5"
    assert shown["data.train"][0] == "/d/{000..009}.tar"
