"""`clipkit shards`: folder / CSV inputs -> img2dataset-layout shards that the training loader reads."""

from __future__ import annotations

import csv
import json
import tarfile

from PIL import Image

from clipkit.data.loader import resolve_shards
from tests.conftest import run_cli
from tests.unit.test_data_faults import epoch_counts


def _images(folder, n, size=(64, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 9 % 256, 80, 160)).save(folder / f"img{i:03d}.{'png' if i % 5 == 0 else 'jpg'}")
        (folder / f"img{i:03d}.txt").write_text(f"a picture number {i}")


def test_folder_to_shards_and_back(tmp_path):
    src = tmp_path / "src"
    _images(src, 25)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "broken.txt").write_text("broken")
    (src / "nocap.jpg").write_bytes((src / "img001.jpg").read_bytes())
    out = tmp_path / "shards"
    proc = run_cli("shards", str(src), str(out), "--shard-size", "10", "--procs", "2", check=True)
    assert "wrote 25 samples in 3 shards" in proc.stdout and "broken.jpg" in proc.stderr
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 25 and len(sizes) == 3
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["failed_to_read"] for s in stats) == 1 and sum(s["failed_no_caption"] for s in stats) == 1
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[0]).read())
    # broken.jpg sorts first and was skipped: its key 000000000 is absent, the next sample keeps 000000001.
    assert names[:3] == ["000000001.json", "000000001.png", "000000001.txt"]
    assert meta["caption"] == "a picture number 0" and meta["status"] == "success" and meta["key"] == "000000001"
    errors, keys = epoch_counts(str(out / "{00000..00002}.tar"), 1, 0)
    assert not errors and len(keys) == 25
    errors, keys = epoch_counts(str(out / "{00000..00002}.tar"), 1, 0, caption_key="json:caption")
    assert not errors and len(keys) == 25


def test_csv_with_resize(tmp_path):
    _images(tmp_path / "imgs", 6, size=(400, 300))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(6):
            w.writerow([f"imgs/img{i:03d}.{'png' if i % 5 == 0 else 'jpg'}", f"caption {i}"])
    out = tmp_path / "shards"
    run_cli("shards", str(tmp_path / "pairs.csv"), str(out), "--resize", "128", "--procs", "1", check=True)
    shards, _ = resolve_shards(str(out / "00000.tar"))
    assert shards[0].num_samples == 6
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert (meta["width"], meta["height"], meta["original_width"]) == (171, 128, 400)


def test_bad_arguments(tmp_path):
    assert run_cli("shards", str(tmp_path / "missing"), str(tmp_path / "o")).returncode == 2
    assert run_cli("shards", str(tmp_path), str(tmp_path / "o"), "--shard-size", "0").returncode == 2
