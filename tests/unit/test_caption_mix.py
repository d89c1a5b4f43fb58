"""``data.captions``: several caption sources mixed with probabilities, drawn per sample and epoch from the seed;
the observed mix follows the probabilities, crops do not move, and a resumed stream replays the same captions and
counts."""

from __future__ import annotations

import collections
import itertools
import json
import random

import open_clip
import pytest
import torch

from clipkit.data.loader import BadSample, DataError, SampleDecoder, TrainLoader, decoded, resolve_shards
from clipkit.data.stream import StreamPlan
from clipkit.data.writer import write_shard, write_sizes_file
from tests.unit.test_data_faults import _jpeg

MIX = (("txt", 0.25), ("json:recaption", 0.75))


def two_caption_shards(root, shards: int = 4, per: int = 300) -> dict[str, dict]:
    """Shards whose samples carry an original caption (txt) and a re-caption (json); every 10th has no re-caption."""
    rng, truth = random.Random(0), {}
    for s in range(shards):
        samples = []
        for i in range(per):
            key = f"s{s}_{i:04d}"
            meta = {} if i % 10 == 0 else {"recaption": f"recaption of {key}"}
            truth[key] = {"txt": f"original {key}", **({"json:recaption": meta["recaption"]} if meta else {})}
            samples.append({"__key__": key, "jpg": _jpeg(rng, 40), "txt": f"original {key}", "json": json.dumps(meta)})
        write_shard(root / f"{s:05d}.tar", samples)
    write_sizes_file(root, {f"{s:05d}.tar": per for s in range(shards)})
    return truth


def epoch_items(spec: str, captions, epoch: int = 0) -> dict:
    shards, weights = resolve_shards(spec)
    decoder = SampleDecoder(("jpg",), "txt", 32, (0.5, 1.0), 0, captions)
    stream = decoded(StreamPlan(shards, weights, "epoch", 0, 1, 64), decoder, 0, epoch, 0)
    out = {}
    for _, _, item, _ in itertools.takewhile(lambda x: x[0] == epoch, stream):
        assert not isinstance(item, BadSample)
        out[item[2]] = item
    return out


def test_the_mix_follows_the_probabilities_and_leaves_the_crops_alone(tmp_path):
    truth = two_caption_shards(tmp_path)
    spec = str(tmp_path / "{00000..00003}.tar")
    mixed, plain = epoch_items(spec, MIX), epoch_items(spec, ())
    assert mixed.keys() == plain.keys() == truth.keys()
    both = [k for k in truth if "json:recaption" in truth[k]]
    chosen = collections.Counter(mixed[k][3] for k in both)
    share = chosen["txt"] / len(both)  # 1,080 samples with both sources: 3 sigma = 0.039
    assert abs(share - 0.25) < 3 * (0.25 * 0.75 / len(both)) ** 0.5, chosen
    for key, (image, caption, _, source, _) in mixed.items():
        assert caption == truth[key][source]  # the caption is the chosen source's
        assert torch.equal(image, plain[key][0])  # the draw has its own stream: crops are the unmixed run's
    assert {mixed[k][3] for k in truth if "json:recaption" not in truth[k]} == {"txt"}  # renormalised to what is there
    # A new epoch draws anew, from the seed: the same again when asked again.
    again, next_epoch = epoch_items(spec, MIX), epoch_items(spec, MIX, epoch=1)
    assert {k: v[3] for k, v in again.items()} == {k: v[3] for k, v in mixed.items()}
    assert sum(next_epoch[k][3] != mixed[k][3] for k in both) > 0.2 * len(both)


def _loader(spec: str) -> TrainLoader:
    shards, weights = resolve_shards(spec)
    return TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "txt", 32, (0.5, 1.0), 0, MIX),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=2,
        batch_size=16,
        window=64,
    )


def test_a_resumed_stream_replays_the_captions_and_their_counts(tmp_path):
    two_caption_shards(tmp_path, shards=2, per=120)
    spec = str(tmp_path / "{00000..00001}.tar")
    whole = _loader(spec)
    try:
        reference = [next(whole)["text"] for _ in range(12)]
        counts = dict(whole.caption_sources)
    finally:
        whole.close()
    first = _loader(spec)
    try:
        texts = [next(first)["text"] for _ in range(5)]
        state = first.state_dict()
    finally:
        first.close()
    resumed = _loader(spec)
    resumed.load_state_dict(state)
    try:
        texts += [next(resumed)["text"] for _ in range(7)]
        assert all(torch.equal(a, b) for a, b in zip(texts, reference, strict=True))
        assert dict(resumed.caption_sources) == counts and sum(counts.values()) == 12 * 16
    finally:
        resumed.close()


def test_sources_no_sample_has_are_named_as_set(tmp_path):
    """When none of the first samples has any of ``data.captions``' sources, the message names that setting, not
    ``data.caption_key`` (which it replaces)."""
    two_caption_shards(tmp_path, shards=1, per=40)
    shards, weights = resolve_shards(str(tmp_path / "00000.tar"))
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "auto", 32, (0.5, 1.0), 0, (("json:nope", 0.5), ("caption", 0.5))),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        batch_size=8,
        window=0,
    )
    with pytest.raises(DataError, match=r"data\.captions=\[json:nope,caption\]: looked for 'json:nope', 'caption'"):
        next(loader)
