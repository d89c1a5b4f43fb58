"""Shards on remote storage, against real servers on loopback: an HTTP server and moto's S3 server (reached
through s3fs/boto3 exactly as a user's S3 would be), with faults injected at the server: connections cut
mid-shard, 503 answers, slow answers, and a shard that keeps failing."""

from __future__ import annotations

import collections
import json

import open_clip
import pytest

from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards
from tests.conftest import run_cli
from tests.servers import FaultyServer, MotoServer, s3_env, with_env
from tests.shardsets import img2dataset_shards

SHARDS, PER_SHARD = 5, 40


def loader(spec: str, workers: int = 2, batch: int = 20, window: int = 30, retries: int = 3) -> TrainLoader:
    shards, weights = resolve_shards(spec)
    return TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "auto", 32, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=batch,
        window=window,
        retries=retries,
        retry_backoff_s=0.05,
        stall_timeout_s=60,
    )


def epoch0(ld: TrainLoader) -> tuple[list[str], collections.Counter]:
    """Keys of epoch 0 in delivery order, and epoch 0's skip counts; the loader is closed."""
    keys = []
    try:
        while not all(e >= 1 for e, _ in ld.positions.values()):
            batch = next(ld)
            keys += [k for k, e in zip(batch["keys"], batch["epochs"], strict=True) if e == 0]
    finally:
        ld.close()
    return keys, collections.Counter(ld.errors_by_epoch().get("0", {}))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2d")
    img2dataset_shards(root, SHARDS, PER_SHARD)  # sizes from _stats.json only, as img2dataset writes them
    return root


@pytest.fixture(scope="module")
def local_epoch(shard_dir):
    return epoch0(loader(f"{shard_dir}/{{00000..{SHARDS - 1:05d}}}.tar"))


def test_http_shards_with_faults_equal_local_disk(shard_dir, local_epoch):
    with FaultyServer(root=shard_dir) as srv:
        srv.plan("00001.tar", "drop")  # connection cut mid-shard once
        srv.plan("00002.tar", "503", "503")  # two 503s
        srv.plan("00003.tar", "slow:1")  # a slow answer
        ld = loader(f"{srv.url}/{{00000..{SHARDS - 1:05d}}}.tar")
        assert [s.num_samples for s in ld.plan.shards] == [PER_SHARD] * SHARDS  # from the remote _stats.json
        keys, errors = epoch0(ld)
        assert srv.gets("00001.tar") >= 2 and srv.gets("00002.tar") >= 3
    assert keys == local_epoch[0]  # same samples, same order, nothing lost to the faults
    assert not errors and len(keys) == SHARDS * PER_SHARD and ld.retried >= 3


def test_a_shard_that_keeps_failing_is_counted_missing_and_named(shard_dir, local_epoch, caplog):
    with FaultyServer(root=shard_dir) as srv:
        srv.plan("00004.tar", "503*")
        keys, errors = epoch0(loader(f"{srv.url}/{{00000..{SHARDS - 1:05d}}}.tar", retries=2))
    assert errors == {"missing": PER_SHARD}
    assert set(keys) == {k for k in local_epoch[0] if not k.startswith("00004")}


def test_resume_fetches_no_shard_before_the_resume_point(shard_dir):
    with FaultyServer(root=shard_dir) as srv:
        spec = f"{srv.url}/{{00000..{SHARDS - 1:05d}}}.tar"
        first = loader(spec, workers=0, batch=PER_SHARD, window=0)
        consumed = [next(first)["keys"] for _ in range(3)]  # three whole shards, in the plan's shard order
        state = first.state_dict()
        first.close()
        done = [seg.url.rsplit("/", 1)[1] for seg in first.plan.segments(0, 0)[:3]]
        assert [k[0][:5] + ".tar" for k in consumed] == done
        before = {name: srv.gets(name) for name in done}
        resumed = loader(spec, workers=0, batch=PER_SHARD, window=0)
        resumed.load_state_dict(state)
        nxt = next(resumed)["keys"]
        resumed.close()
        assert {name: srv.gets(name) for name in done} == before  # not fetched again
    assert nxt[0][:5] + ".tar" not in done


@pytest.fixture(scope="module")
def s3_bucket(shard_dir):
    with MotoServer() as moto:
        client = moto.client()
        client.create_bucket(Bucket="laion-mini")
        for path in sorted(shard_dir.iterdir()):
            client.upload_file(str(path), "laion-mini", f"i2d/{path.name}")
        sizes = {f"{s:05d}.tar": PER_SHARD for s in range(SHARDS)}
        client.put_object(Bucket="laion-mini", Key="i2d/sizes.json", Body=json.dumps(sizes).encode())
        yield moto


def test_s3_shards_through_s3fs_with_faults_equal_local_disk(s3_bucket, local_epoch):
    with FaultyServer(upstream=s3_bucket.url) as proxy, with_env(s3_env(proxy.url)):
        proxy.plan("00000.tar", "503")
        proxy.plan("00002.tar", "drop")
        proxy.plan("00003.tar", "slow:1")
        ld = loader(f"s3://laion-mini/i2d/{{00000..{SHARDS - 1:05d}}}.tar")
        keys, errors = epoch0(ld)
        assert proxy.gets("sizes.json") >= 1 and proxy.gets("_stats.json") == 0  # one read plans the epoch
    assert keys == local_epoch[0] and not errors and ld.retried >= 2


def test_clipkit_train_on_s3_as_a_user_types_it(s3_bucket, tmp_path):
    """The command a user with data on S3 types (credentials and endpoint in the environment), here LiT with cached
    image features: the build's loader workers read every shard from S3, and training reads them all from the
    cache."""
    spec = f"s3://laion-mini/i2d/{{00000..{SHARDS - 1:05d}}}.tar"
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        f"hydra.run.dir={run}",
        f"data.train={spec}",
        "model.lock_image=true",
        "data.cache_image_features=true",
        "data.crop_scale_min=1",
        f"data.feature_cache_dir={tmp_path / 'features'}",
        "train.steps=3",
        "train.global_batch_size=32",
        "data.num_workers=2",
        "eval.zeroshot.dataset=",
        "eval.retrieval.dataset=",
        "logging.progress=false",
        "logging.report=false",
        env=s3_env(s3_bucket.url),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 1 and losses[0] > 0  # (log_every=10: the last step is logged)
    summary = json.loads((run / "summary.json").read_text())
    cached = summary["cached_features"]["image"]
    assert (cached["done"], cached["failed"], cached["rows"]) == (SHARDS, 0, SHARDS * PER_SHARD)
    assert not summary.get("data_errors"), summary  # (every sample read from the cache: none uncached)


def test_eval_source_over_http_equals_local(shard_dir):
    """Eval datasets stream from remote storage too: the same records, captions and images as on local disk."""
    from clipkit.eval.config import RetrievalConfig
    from clipkit.eval.data import retrieval_source

    def records(spec):
        return [
            (i, load() if load else None, target)
            for i, load, target in retrieval_source(spec, RetrievalConfig()).records()
        ]

    names = f"{{00000..{SHARDS - 1:05d}}}.tar"
    with FaultyServer(root=shard_dir) as srv:
        srv.plan("00003.tar", "drop")
        remote = records(f"{srv.url}/{names}")
    local = records(f"{shard_dir}/{names}")
    assert len(local) == SHARDS * PER_SHARD and remote == local
