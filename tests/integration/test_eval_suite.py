"""`clipkit eval` on image folders, CSV tables and COCO JSON; parity with CLIP_benchmark on the same model and data;
2 ranks equal 1 rank; bad inputs give clear errors or counted skips."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.data.stream import iter_shard
from tests.conftest import run_cli

NUM_IMAGES = 101  # odd: does not divide over 2 ranks


@pytest.fixture(scope="module")
def trained(demo_run, tmp_path_factory) -> Path:
    """A copy of the session's trained run (40 steps: 13.6% zero-shot top-1 against 2.8% chance, so the metrics
    are not all ties)."""
    run = tmp_path_factory.mktemp("eval_model") / "run"
    shutil.copytree(demo_run[0], run)
    return run


def demo_samples(split_dir: Path, limit: int):
    out = []
    for tar in sorted(split_dir.glob("*.tar")):
        for sample in iter_shard(str(tar)):
            out.append(sample)
            if len(out) == limit:
                return out
    return out


@pytest.fixture(scope="module")
def folders(small_demo, tmp_path_factory) -> dict:
    """The demo's held-out images as an image folder and a retrieval CSV + COCO JSON."""
    root = tmp_path_factory.mktemp("eval_data")
    names = (small_demo / "zeroshot" / "classnames.txt").read_text().split("\n")
    names = [n for n in names if n]
    folder = root / "folder"
    for i, sample in enumerate(demo_samples(small_demo / "zeroshot", NUM_IMAGES)):
        cls_dir = folder / names[int(sample["cls"])].replace(" ", "_")
        cls_dir.mkdir(parents=True, exist_ok=True)
        (cls_dir / f"{i:04d}.jpg").write_bytes(sample["jpg"])
    for name in names:  # classes without held-out images in the first 101 still get a folder with one image
        cls_dir = folder / name.replace(" ", "_")
        if not cls_dir.exists():
            cls_dir.mkdir(parents=True)
            (cls_dir / "filler.jpg").write_bytes(next(folder.rglob("*.jpg")).read_bytes())

    images = root / "images"
    images.mkdir()
    rows, coco = [], {"images": [], "annotations": []}
    samples = demo_samples(small_demo / "retrieval", 51)
    # The demo's templated captions repeat across images; identical strings tie exactly, and CLIP_benchmark's
    # topk breaks ties arbitrarily. Keep the captions that belong to one image only.
    counts: dict[str, int] = {}
    for sample in samples:
        for c in set(json.loads(sample["json"])["captions"]):
            counts[c] = counts.get(c, 0) + 1
    for i, sample in enumerate(samples):
        (images / f"{i:04d}.jpg").write_bytes(sample["jpg"])
        caps = [c for c in json.loads(sample["json"])["captions"] if counts[c] == 1] or [f"an unrelated caption {i}"]
        rows += [{"image": f"images/{i:04d}.jpg", "caption": c} for c in caps]
        coco["images"].append({"id": i, "file_name": f"images/{i:04d}.jpg"})
        coco["annotations"] += [{"image_id": i, "caption": c} for c in caps]
    with open(root / "retrieval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "coco.json").write_text(json.dumps(coco))
    return {"root": root, "folder": folder, "classnames": names}


def clipkit_eval(checkpoint: Path, out: Path, *overrides: str, nproc: int = 1) -> dict:
    args = [
        f"checkpoint={checkpoint}",
        f"eval.output={out}",
        "eval.batch_size=64",
        "logging.progress=false",
        "logging.report=false",
    ]
    if nproc == 1:
        run_cli("eval", *args, *overrides, check=True)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run(
            [*cmd, "-m", "clipkit", "eval", *args, *overrides],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_metrics_equal_clip_benchmark(trained, folders, tmp_path):
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.metrics import zeroshot_classification as cb_cls
    from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
    from torchvision.datasets import ImageFolder

    from clipkit.checkpoint import resolve
    from clipkit.eval.embedding import eval_transform
    from clipkit.evaluate import load_trained

    result = clipkit_eval(
        trained,
        tmp_path / "ours.json",
        f"eval.zeroshot.dataset={folders['folder']}",
        f"eval.retrieval.dataset={folders['root'] / 'retrieval.csv'}",
    )["eval"]
    built, _ = load_trained(resolve(trained), torch.device("cpu"))
    model, preprocess = built.model.eval(), eval_transform(built.model)
    templates = ["a photo of a {c}."]  # clipkit's default for a folder without a template file

    dataset = ImageFolder(str(folders["folder"]), transform=preprocess)
    ref = cb_cls.evaluate(
        model,
        torch.utils.data.DataLoader(dataset, batch_size=64),
        built.tokenizer,
        [c.replace("_", " ") for c in dataset.classes],
        templates,
        "cpu",
        amp=False,
    )
    ours = result["zeroshot"]
    assert ours["num_samples"] == len(dataset) and 2 * ours["chance"] < ours["acc1"] < 1.0  # above chance
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key

    rows = list(csv.DictReader(open(folders["root"] / "retrieval.csv")))
    by_image: dict[str, list[str]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r["caption"])
    pairs = [(preprocess(Image.open(folders["root"] / k)), v) for k, v in by_image.items()]
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=64, collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b])
    )
    ref = cb_ret.evaluate(model, loader, built.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = result["retrieval"]
    n_img, n_txt = ours["num_images"], ours["num_texts"]
    assert (n_img, n_txt) == (len(pairs), len(rows))
    for k in (1, 5, 10):  # CLIP_benchmark averages in float32: compare the hit counts, which are integers
        assert round(ours[f"image_to_text_R@{k}"] * n_img) == round(ref[f"text_retrieval_recall@{k}"] * n_img)
        assert round(ours[f"text_to_image_R@{k}"] * n_txt) == round(ref[f"image_retrieval_recall@{k}"] * n_txt)
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-6)


def test_two_ranks_equal_one_rank_with_skips(trained, folders, tmp_path):
    """101 images + 1 unreadable file over 2 ranks: the same metrics, per-class recalls and skip counts."""
    (folders["folder"] / "blue_circle" / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    overrides = [
        f"eval.zeroshot.dataset={folders['folder']}",
        f"eval.retrieval.dataset={folders['root'] / 'coco.json'}",
        "eval.num_workers=2",
    ]
    one = clipkit_eval(trained, tmp_path / "one.json", *overrides)
    two = clipkit_eval(trained, tmp_path / "two.json", *overrides, nproc=2)
    assert two["world_size"] == 2
    assert one["eval"]["zeroshot"]["skipped"] == {"bad_image": 1}
    for task in ("zeroshot", "retrieval"):
        a, b = one["eval"][task], two["eval"][task]
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=1e-9), (task, key)
            else:
                assert b[key] == value, (task, key)
    (folders["folder"] / "blue_circle" / "zz_broken.jpg").unlink()


def test_suite_file_runs_several_datasets(trained, folders, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(folders["classnames"]))
    table = tmp_path / "labels.csv"
    images = sorted(folders["folder"].rglob("*.jpg"))[:20]
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows([(str(p), p.parent.name.replace("_", " ")) for p in images])  # labels by class name
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"- {{name: folder, task: zeroshot, dataset: {folders['folder']}, templates: cifar}}\n"
        f"- {{name: table, task: zeroshot, dataset: {table}, classnames: {names}}}\n"
        f"- {{name: coco, task: retrieval, dataset: {folders['root'] / 'coco.json'}}}\n"
    )
    out = clipkit_eval(
        trained, tmp_path / "suite.json", f"eval.suite={suite}", "eval.zeroshot.dataset=", "eval.retrieval.dataset="
    )
    assert set(out["eval"]) == {"folder", "table", "coco"}
    assert out["eval"]["table"]["num_samples"] == 20 and out["eval"]["coco"]["num_images"] == 51

    suite.write_text(f"- {{name: x, task: zeroshot, dataset: {folders['folder']}, clasnames: oops}}\n")
    proc = run_cli("eval", f"checkpoint={trained}", f"eval.suite={suite}")
    assert proc.returncode == 2 and "clasnames" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_eval_inputs(trained, folders, tmp_path):
    empty = tmp_path / "empty_classes"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    (empty / "dog" / "a.jpg").write_bytes(next(folders["folder"].rglob("*.jpg")).read_bytes())
    proc = run_cli("eval", f"checkpoint={trained}", f"eval.zeroshot.dataset={empty}", "eval.retrieval.dataset=")
    assert proc.returncode == 1 and "cat: class folder has no images" in proc.stderr, proc.stderr[-2000:]

    bad_templates = tmp_path / "t.txt"
    bad_templates.write_text("a photo of a {c}.\nno placeholder here\n")
    proc = run_cli("eval", f"checkpoint={trained}", f"eval.zeroshot.templates={bad_templates}")
    assert proc.returncode == 2 and "eval.zeroshot.templates" in proc.stderr and "no placeholder here" in proc.stderr

    coco = json.loads((folders["root"] / "coco.json").read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 3]  # image 3 has no caption
    (folders["root"] / "coco_gap.json").write_text(json.dumps(coco))
    out = clipkit_eval(
        trained,
        tmp_path / "gap.json",
        "eval.zeroshot.dataset=",
        f"eval.retrieval.dataset={folders['root'] / 'coco_gap.json'}",
    )
    assert out["eval"]["retrieval"]["skipped"] == {"no_caption": 1} and out["eval"]["retrieval"]["num_images"] == 50


def test_folder_classnames_file_in_another_order_is_matched_by_name(trained, folders, tmp_path):
    """An image folder (sub-folders sorted alphabetically) with a class-name file in the dataset's natural order:
    names are matched to folders by name, so the accuracy is the folder names' own. A file of wnid-style
    folders' names maps by sorted folder position (and says so); a file of another length is refused."""
    natural = tmp_path / "natural.txt"
    natural.write_text("\n".join(folders["classnames"]))  # demo order: red circle, red square, ...
    assert folders["classnames"] != sorted(folders["classnames"])
    common = ["eval.retrieval.dataset=", f"eval.zeroshot.dataset={folders['folder']}"]
    by_folder = clipkit_eval(trained, tmp_path / "a.json", *common)["eval"]["zeroshot"]
    by_file = clipkit_eval(trained, tmp_path / "b.json", *common, f"eval.zeroshot.classnames={natural}")
    assert by_file["eval"]["zeroshot"]["acc1"] == by_folder["acc1"] > 3 / len(folders["classnames"])

    wnid = tmp_path / "wnid"
    wnid.mkdir()
    for i, name in enumerate(sorted(p.name for p in folders["folder"].iterdir())):
        (wnid / f"n{i:08d}").symlink_to(folders["folder"] / name, target_is_directory=True)
    names_in_folder_order = tmp_path / "wnid_names.txt"
    names_in_folder_order.write_text("\n".join(sorted(n.replace("_", " ") for n in os.listdir(folders["folder"]))))
    proc = run_cli(
        "eval",
        f"checkpoint={trained}",
        f"eval.zeroshot.dataset={wnid}",
        f"eval.zeroshot.classnames={names_in_folder_order}",
        "eval.retrieval.dataset=",
        f"eval.output={tmp_path / 'c.json'}",
        check=True,
    )
    assert "by sorted folder position: n00000000 -> blue circle" in proc.stderr
    assert json.loads((tmp_path / "c.json").read_text())["eval"]["zeroshot"]["acc1"] == by_folder["acc1"]

    short = tmp_path / "short.txt"
    short.write_text("\n".join(folders["classnames"][:-1]))
    proc = run_cli("eval", f"checkpoint={trained}", *common, f"eval.zeroshot.classnames={short}")
    assert proc.returncode == 1 and "35 class names" in proc.stderr and "36 class sub-folders" in proc.stderr
