"""The embedded demo data: deterministic bytes, real multi-factor image-text content, and its eval splits."""

from __future__ import annotations

import hashlib
import json
import tarfile

from clipkit.data.demo import DemoSpec, generate, make_sample, zeroshot_classnames


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_in_any_process_count(tmp_path):
    spec = DemoSpec(num_train=300, num_zeroshot=72, num_retrieval=40, shard_size=128)
    a = _digests(generate(spec, tmp_path / "a", num_procs=1))
    b = _digests(generate(spec, tmp_path / "b", num_procs=2))
    assert a == b and len([k for k in a if k.endswith(".tar")]) == 3 + 1 + 1
    c = _digests(generate(DemoSpec(**{**vars(spec), "seed": 1}), tmp_path / "c"))
    assert c["train/00000.tar"] != a["train/00000.tar"]


def test_splits_layout_and_sizes(tmp_path):
    spec = DemoSpec(num_train=300, num_zeroshot=72, num_retrieval=40, shard_size=128)
    root = generate(spec, tmp_path)
    sizes = json.loads((root / "train" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 128, "00001.tar": 128, "00002.tar": 44}
    with tarfile.open(root / "train" / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["train0000000.jpg", "train0000000.json", "train0000000.txt"]
    assert (root / "zeroshot" / "classnames.txt").read_text().split("\n")[:2] == zeroshot_classnames()[:2]
    assert all("{c}" in t for t in (root / "zeroshot" / "templates.txt").read_text().splitlines())


def test_captions_describe_the_image_and_vary():
    samples = [make_sample("train", i, 0, 40, 4) for i in range(200)]
    metas = [json.loads(s["json"]) for s in samples]
    assert all(len(m["captions"]) >= 2 for m in metas)
    # Captions mention the colour most of the time, never a wrong colour.
    mention = sum(m["color"] in " ".join(m["captions"]) for m in metas)
    assert mention > 0.9 * len(metas)
    colours = {"red", "green", "blue", "yellow", "purple", "orange"}
    for m in metas:
        for cap in m["captions"]:
            assert not (set(cap.split()) & colours) - {m["color"]}, cap
    # Many distinct caption wordings, and every factor varies.
    assert len({c for m in metas for c in m["captions"]}) > 300
    for factor in ("shape", "color", "bg", "size", "position", "count"):
        assert len({m[factor] for m in metas}) > 1, factor
    # Plurals are English ("crosses"; v1 of the generator wrote "crosss", a word the prompts never use).
    words = {w.strip(",.") for m in metas for c in m["captions"] for w in c.split()}
    assert "crosses" in words and not {w for w in words if w.endswith("sss")}


def test_zeroshot_labels_match_class_names():
    for i in range(50):
        s = make_sample("zeroshot", i, 0, 40, 2)
        assert zeroshot_classnames()[int(s["cls"])] == json.loads(s["json"])["classname"]
