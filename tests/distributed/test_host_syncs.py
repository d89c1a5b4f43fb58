"""A training step does not wait for the device needlessly (issue 15): counted on 2 gloo ranks by wrapping
``Tensor.item/tolist/__bool__/__float__/__int__`` (reads made from clipkit's code) and every
``torch.distributed`` collective, around the real ``clipkit.train.train`` loop.

Budget of a step that neither logs, checkpoints nor agrees on signals: no host read at all (whether the update
is applied is decided on the device, issue 27; ``train.nonfinite`` is enforced when the loop next reads) and the
loss's 4 collectives (gather image and text embeddings; reduce their gradients). A logging step adds one read
(every value the log and the policy need, in one transfer) and one all-reduce (the global-batch loss); a
signal-agreement step one all-reduce and one read. DDP's own gradient all-reduce runs inside its C++ reducer and
is not a Python call.
"""

from __future__ import annotations

import json

from tests.distributed.ranks import start_ranks
from tests.distributed.workers import count_host_syncs
from tests.ports import free_port

STEPS, LOG_EVERY, CHECK_EVERY = 16, 8, 4


def test_steps_stay_within_the_host_sync_budget(small_demo, cache_dir, tmp_path):
    out = tmp_path / "counts.json"
    overrides = [
        "data.demo.num_train=2000",
        "data.demo.num_zeroshot=360",
        "data.demo.num_retrieval=200",
        "data.demo.shard_size=600",
        "data.num_workers=1",
        f"train.steps={STEPS}",
        "train.global_batch_size=32",
        f"train.log_every={LOG_EVERY}",
        "train.checkpoint_every=1000",
        f"parallel.signal_check_every={CHECK_EVERY}",
        "optim.warmup_steps=2",
        "logging.progress=false",
        "logging.report=false",
        "eval.zeroshot.dataset=",
        "eval.retrieval.dataset=",
    ]
    args = (2, free_port(), str(out), str(cache_dir), overrides)
    start_ranks(count_host_syncs, args, nprocs=2)
    per_step = json.loads(out.read_text())
    assert [s["step"] for s in per_step] == list(range(1, STEPS + 1))
    # The counts between the boundaries of steps N-1 and N cover: signal agreement after N-1 (if due), the
    # fetch, the step N itself and its log (if due). The first step also builds things; it is left out.
    for s in per_step[1:]:
        n, logs, agrees = s["step"], s["step"] % LOG_EVERY == 0, (s["step"] - 1) % CHECK_EVERY == 0
        reads, collectives = s.get("reads", 0), s.get("collectives", 0)
        assert reads <= logs + agrees, (n, s)
        assert collectives <= 4 + logs + agrees, (n, s)
        if not logs and not agrees:
            assert reads == 0 and collectives == 4, (n, s)
