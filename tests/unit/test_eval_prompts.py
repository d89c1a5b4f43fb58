"""Built-in class names / templates and user files."""

from __future__ import annotations

import json

import pytest

from clipkit.eval import prompts


def test_builtin_sets():
    assert len(prompts.classnames("imagenet1k")) == 1000
    assert len(prompts.templates(None, "imagenet1k")) == 80  # OpenAI's, through open_clip
    assert prompts.templates(None, "imagenet1k")[0] == "a bad photo of a {c}."
    assert len(prompts.templates("simple_imagenet")) == 7
    c10, c100 = prompts.classnames("cifar10"), prompts.classnames("cifar100")
    assert len(c10) == 10 and len(set(c100)) == 100 and "aquarium fish" in c100 and "willow tree" in c100
    assert len(prompts.templates(None, "cifar100")) == 18
    assert prompts.templates(None, None) == ["a photo of a {c}."]


@pytest.mark.parametrize("suffix", [".txt", ".json", ".yaml"])
def test_user_files(tmp_path, suffix):
    names, temps = ["red circle", "blue star"], ["a photo of a {c}.", "art of the {c}"]
    for stem, items in (("names", names), ("temps", temps)):
        path = tmp_path / f"{stem}{suffix}"
        if suffix == ".txt":
            path.write_text("\n".join(items) + "\n\n")
        elif suffix == ".json":
            path.write_text(json.dumps(items))
        else:
            path.write_text("".join(f"- '{x}'\n" for x in items))
    assert prompts.classnames(str(tmp_path / f"names{suffix}")) == names
    assert prompts.templates(str(tmp_path / f"temps{suffix}")) == temps


def test_template_without_placeholder_is_refused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {c}.\na photo of something\n")
    with pytest.raises(ValueError, match="a photo of something"):
        prompts.templates(str(path))


def test_folder_names_are_the_default():
    assert prompts.classnames(None, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="class names are needed"):
        prompts.classnames(None)
