"""Case 4: dirty shards (1% truncated JPEGs, 1% non-images, 1% missing captions, 0.5% empty captions, one cut
tar, one missing shard): the run completes, per-kind counts equal the injected ones, throughput stays within
20% of the same data clean."""

from __future__ import annotations

import collections
import json
import random
import shutil

import pytest

from clipkit.data.writer import write_shard, write_sizes_file
from tests.reliability.harness import record, train
from tests.unit.test_data_faults import _jpeg, cut_tar

pytestmark = pytest.mark.reliability

NUM_SHARDS, PER_SHARD = 6, 200  # 1,200 samples; shard 4 is cut, shard 5 is missing


def make_shards(root, dirty: bool) -> collections.Counter:
    rng = random.Random(0)
    total = NUM_SHARDS * PER_SHARD
    kinds = ["truncated"] * (total // 100) + ["nonimage"] * (total // 100) + ["nocaption"] * (total // 100)
    kinds += ["emptycaption"] * (total // 200)
    slots = list(range(4 * PER_SHARD))  # faults go into shards 0-3 (4 is cut, 5 goes missing)
    rng.shuffle(slots)
    planned = dict(zip(slots, kinds, strict=False)) if dirty else {}
    expected = collections.Counter()
    root.mkdir(parents=True)
    sizes = {}
    for s in range(NUM_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            kind = planned.get(s * PER_SHARD + i, "ok")
            sample = {"__key__": f"s{s}_{i:04d}", "jpg": _jpeg(rng), "txt": f"caption {s} {i}"}
            if kind == "truncated":
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
            elif kind == "nonimage":
                sample["jpg"] = b"<html>not an image</html>" * 8
            elif kind == "nocaption":
                del sample["txt"]
            elif kind == "emptycaption":
                sample["txt"] = "  "
            expected[
                {
                    "truncated": "bad_image",
                    "nonimage": "bad_image",
                    "nocaption": "no_caption",
                    "emptycaption": "empty_caption",
                }.get(kind, "ok")
            ] += 1
            samples.append(sample)
        write_shard(root / f"{s:05d}.tar", samples)
        sizes[f"{s:05d}.tar"] = PER_SHARD
    write_sizes_file(root, sizes)
    if dirty:
        expected["missing"] += len(cut_tar(root / "00004.tar", keep_samples=150))
        (root / "00005.tar").unlink()
        expected["missing"] += PER_SHARD
    del expected["ok"]
    return expected


def run(root, run_dir):
    proc = train(
        run_dir,
        "data=shards",
        f"data.train='{root}/{{00000..{NUM_SHARDS - 1:05d}}}.tar'",
        "data.mode=epoch",
        "data.num_workers=1",
        "data.allow_missing_shards=true",
        "data.max_bad_fraction=0.5",
        "train.steps=70",  # 70 x 16 = 1,120 samples: past the end of the first epoch
        "train.global_batch_size=16",
        "train.log_every=5",
        "train.checkpoint_every=1000",
        "train.record_keys=false",
    )
    summary = json.loads((run_dir / "summary.json").read_text()) if proc.returncode == 0 else {}
    rates = [json.loads(x)["samples_per_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()[2:]]
    return proc, summary, sum(rates) / max(1, len(rates))


def test_dirty_shards(small_demo, tmp_path):
    make_shards(tmp_path / "clean", dirty=False)
    expected = make_shards(tmp_path / "dirty", dirty=True)
    _, _, clean_rate = run(tmp_path / "clean", tmp_path / "clean_run")
    proc, summary, dirty_rate = run(tmp_path / "dirty", tmp_path / "dirty_run")
    counts = summary.get("data_errors_by_epoch", {}).get("0", {})
    ratio = dirty_rate / clean_rate
    ok = proc.returncode == 0 and counts == dict(expected) and ratio > 0.8
    fig = f"epoch-0 counts {dict(sorted(counts.items()))} (injected: equal={counts == dict(expected)}); "
    fig += f"throughput dirty/clean {ratio:.2f}"
    record("dirty shards", 1, int(ok), fig)
    assert ok, (proc.stderr[-1500:], counts, dict(expected), ratio)
    shutil.rmtree(tmp_path / "clean")
