"""The zero-shot classifier split over ranks equals one process's, also with fewer classes than ranks."""

from __future__ import annotations

import os

import torch

from tests.distributed.ranks import start_ranks
from tests.ports import free_port

CLASSES = ["red circle", "blue star"]


def _classifier():
    from clipkit import model as model_lib
    from clipkit.eval.zeroshot import build_classifier
    from clipkit.model_config import ModelConfig

    torch.manual_seed(0)
    built = model_lib.build(ModelConfig())
    return build_classifier(built.model.eval(), built.tokenizer, CLASSES, ["a photo of a {c}."], "cpu")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    classifier = _classifier()
    if rank == 0:
        torch.save(classifier, out)
    dist.destroy_process_group()


def test_fewer_classes_than_ranks(tmp_path):
    out = tmp_path / "classifier.pt"
    start_ranks(_worker, (3, free_port(), str(out)), nprocs=3)
    three = torch.load(out)
    assert three.shape[1] == len(CLASSES)
    torch.testing.assert_close(three, _classifier(), atol=1e-6, rtol=0)
