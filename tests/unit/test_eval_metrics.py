"""Eval metrics against an independent, loop-based implementation of CLIP_benchmark's definitions."""

from __future__ import annotations

import torch

from clipkit.eval.retrieval import retrieval_metrics
from clipkit.eval.zeroshot import classification_metrics


def _reference_retrieval(img, txt, owner, k):
    """CLIP_benchmark: a query is a hit when at least one correct item is among its top k."""
    sims = img @ txt.T
    i2t = sum(any(owner[j] == i for j in sims[i].topk(k).indices.tolist()) for i in range(len(img))) / len(img)
    t2i = sum(owner[j] in sims[:, j].topk(k).indices.tolist() for j in range(len(txt))) / len(txt)
    return i2t, t2i


def test_retrieval_recall_matches_reference_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=-1)
    owner = torch.tensor([i for i in range(37) for _ in range(1 + i % 3)])
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(len(owner), 16, generator=g), dim=-1)
    full = retrieval_metrics(img, txt, owner, chunk=10**6)
    assert full == retrieval_metrics(img, txt, owner, chunk=5)
    assert full == retrieval_metrics(img, txt, owner, budget_bytes=4 * len(owner) * 3)  # 3-row blocks
    for k in (1, 5, 10):
        i2t, t2i = _reference_retrieval(img, txt, owner, k)
        assert abs(full[f"image_to_text_R@{k}"] - i2t) < 1e-9
        assert abs(full[f"text_to_image_R@{k}"] - t2i) < 1e-9
    assert 0 < full["image_to_text_R@1"] < full["image_to_text_R@10"] <= 1


def test_classification_metrics_match_loops():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 7, generator=g)
    labels = torch.randint(0, 7, (200,), generator=g)
    labels[labels == 6] = 5  # class 6 absent: it must not count in the per-class mean
    m = classification_metrics(logits, labels, 7)
    pred = logits.argmax(1)
    assert abs(m["acc1"] - (pred == labels).sum().item() / 200) < 1e-12
    top5 = [labels[i].item() in logits[i].topk(5).indices.tolist() for i in range(200)]
    assert abs(m["acc5"] - sum(top5) / 200) < 1e-12
    recalls = [(pred[labels == c] == c).sum().item() / (labels == c).sum().item() for c in range(6)]
    assert abs(m["mean_per_class_recall"] - sum(recalls) / 6) < 1e-9
    assert set(m["per_class_recall"]) == set(range(6)) and m["chance"] == 1 / 7
