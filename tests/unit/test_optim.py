"""Parameter groups: weight decay follows open_clip's trainer, so its published recipes reproduce."""

from __future__ import annotations

import torch

from clipkit.model import ModelConfig, build
from clipkit.optim import OptimConfig, build_optimizer


def _no_decay_names(model, optimizer) -> set[str]:
    ids = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_groups_match_open_clip_train_for_vit_b32():
    model = build(ModelConfig(name="ViT-B-32")).model
    # open_clip_train/main.py, written out here: what its optimizer exempts from weight decay
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    expected = {n for n, p in model.named_parameters() if exclude(n, p)}
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.2), torch.device("cpu"))
    assert _no_decay_names(model, optimizer) == expected
    assert {"positional_embedding", "token_embedding.weight", "visual.positional_embedding"}.isdisjoint(expected)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    optimizer = build_optimizer(
        model, OptimConfig(weight_decay=0.2, exclude_embeddings_from_decay=True), torch.device("cpu")
    )
    extra = _no_decay_names(model, optimizer) - expected
    assert extra == {"positional_embedding", "token_embedding.weight", "visual.positional_embedding"}
