"""Case 4: dirty shards (1% truncated JPEGs, 1% non-images, 1% missing captions, 0.5% empty captions, one cut
tar, one missing shard): the run completes, per-kind counts equal the injected ones, and bad data costs little,
counted as work, not seconds: every shard is opened once (no retry, no re-read), every bad image is decoded once,
a sample without a caption is never decoded, exactly as for the same shards clean. (The dirty/clean throughput
is a figure of ``benchmarks/loader_throughput.py --dirty``, not a verdict.)"""

from __future__ import annotations

import collections
import itertools
import json
import random

import pytest

from clipkit.data.writer import write_shard, write_sizes_file
from tests.reliability.harness import record, train
from tests.shardsets import COUNTED_AS, FAULTS, inject
from tests.unit.test_data_faults import _jpeg, cut_tar

pytestmark = pytest.mark.reliability

NUM_SHARDS, PER_SHARD = 6, 200  # 1,200 samples; shard 4 is cut, shard 5 is missing


def make_shards(root, dirty: bool) -> collections.Counter:
    rng = random.Random(0)
    total = NUM_SHARDS * PER_SHARD
    kinds = [kind for kind, fraction in FAULTS.items() for _ in range(round(fraction * total))]
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
            sample = inject({"__key__": f"s{s}_{i:04d}", "jpg": _jpeg(rng), "txt": f"caption {s} {i}"}, kind)
            expected[COUNTED_AS.get(kind, "ok")] += 1
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
    return train(
        run_dir,
        "data=shards",
        f"data.train='{root}/{{00000..{NUM_SHARDS - 1:05d}}}.tar'",
        "data.mode=epoch",
        "data.num_workers=1",
        "data.allow_missing_shards=true",
        "data.max_bad_fraction=0.5",
        # 16 streams (a global batch of 16) of 75 samples of epoch 0 each, 1 per step: after 90 steps every stream
        # is past the end of the first epoch (a stream with bad samples sooner)
        "train.steps=90",
        "train.global_batch_size=16",
        "train.log_every=5",
        "train.checkpoint_every=1000",
        "train.record_keys=false",
    )


def epoch_work(root, monkeypatch) -> dict:
    """One epoch of the loader's own stream over ``root``, in-process, counting the work: tar opens per shard,
    image decodes per key, and what each sample became."""
    from clipkit.data import remote, transforms
    from clipkit.data.loader import BadSample, SampleDecoder, decoded, resolve_shards
    from clipkit.data.stream import Reader, StreamPlan

    opens, decodes = collections.Counter(), collections.Counter()
    open_stream, train_image = remote.open_stream, transforms.train_image

    def counted_open(url, *args, **kwargs):
        opens[url.rsplit("/", 1)[-1]] += 1
        return open_stream(url, *args, **kwargs)

    current = {}

    def counted_decode(data, *args, **kwargs):
        decodes[current["key"]] += 1
        return train_image(data, *args, **kwargs)

    monkeypatch.setattr(remote, "open_stream", counted_open)
    monkeypatch.setattr(transforms, "train_image", counted_decode)
    shards, weights = resolve_shards(f"{root}/{{00000..{NUM_SHARDS - 1:05d}}}.tar", allow_missing=True)
    plan = StreamPlan(shards, weights, "epoch", 0, 1, 64)
    decoder = SampleDecoder(("jpg",), "txt", 32, (0.9, 1.0), 0)

    def keyed(sample, epoch):
        current["key"] = sample["__key__"]
        return decoder(sample, epoch)

    reader = Reader()
    outcome = {}
    # exactly the epoch's positions (plan.total, missing samples included): the stream opens nothing of epoch 1
    for epoch, _, item, _ in itertools.islice(decoded(plan, keyed, 0, 0, 0, reader), plan.total):
        assert epoch == 0
        key = item[2] if not isinstance(item, BadSample) else f"bad-{len(outcome)}"
        outcome[key] = "ok" if not isinstance(item, BadSample) else item.kind
    monkeypatch.undo()
    return {"opens": opens, "decodes": decodes, "outcome": outcome, "retries": reader.num_retries}


def test_dirty_shards(small_demo, tmp_path, monkeypatch):
    clean = make_shards(tmp_path / "clean", dirty=False)
    expected = make_shards(tmp_path / "dirty", dirty=True)
    proc = run(tmp_path / "dirty", tmp_path / "dirty_run")
    summary = json.loads((tmp_path / "dirty_run" / "summary.json").read_text()) if proc.returncode == 0 else {}
    counts = summary.get("data_errors_by_epoch", {}).get("0", {})

    work = {name: epoch_work(tmp_path / name, monkeypatch) for name in ("clean", "dirty")}
    dirty, ref = work["dirty"], work["clean"]
    bad_images = [k for k, n in dirty["decodes"].items() if k not in dirty["outcome"]]
    checks = {
        # each shard is opened exactly once (the missing one: one attempt), as for the same shards clean; no retry
        "one read per shard": dirty["opens"] == ref["opens"]
        and set(ref["opens"].values()) == {1}
        and dirty["retries"] == ref["retries"] == 0,
        # every image is decoded at most once; the bad ones exactly once (one attempt, no retry)
        "one decode per image": set(dirty["decodes"].values()) == {1} and len(bad_images) == expected["bad_image"],
        # a sample that fails its caption check is never decoded: decodes = good + bad images
        "no decode without a caption": sum(dirty["decodes"].values())
        == sum(v == "ok" for v in dirty["outcome"].values()) + expected["bad_image"],
    }
    ok = proc.returncode == 0 and counts == dict(expected) and clean == {} and all(checks.values())
    fig = f"epoch-0 counts {dict(sorted(counts.items()))} (injected: equal={counts == dict(expected)}); "
    fig += ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in checks.items())
    record("dirty shards", 1, int(ok), fig)
    assert ok, (proc.stderr[-1500:], counts, dict(expected), checks)
