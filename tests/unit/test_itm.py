"""The ITM head and its hard-negative draw (clipkit/itm.py, clipkit/loss/itm.py), and ITM re-ranking in retrieval
eval, against independent implementations. The term's exactness at world sizes 1, 2 and 4 (float64, gradient
caching, canonical ids in another order, CoCa) is in tests/distributed/test_loss_exact.py."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch

from clipkit import itm
from clipkit.eval.retrieval import itm_rerank_metrics, retrieval_metrics
from clipkit.loss.itm import draws, hard_negatives
from clipkit.model import build
from clipkit.model_config import ModelConfig


def test_negatives_follow_the_softmax_over_the_other_columns():
    """20,000 draws for one row: never its own column, each other column as often as softmax(sim) over the
    others says (within 5 standard deviations)."""
    sim = torch.tensor([[2.0, 0.5, 1.5, -1.0, 1.9, 0.0]], dtype=torch.float64)
    ids = torch.arange(6)
    n = 20_000
    u = draws(0, 1, n)[0]
    picks = torch.stack([hard_negatives(sim, ids[:1] * 0 + 0, ids, u[i : i + 1]) for i in range(n)])[:, 0]
    assert not (picks == 0).any()
    want = torch.softmax(sim[0, 1:], dim=0)
    for j in range(1, 6):
        p = want[j - 1].item()
        got = (picks == j).double().mean().item()
        assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / n), (j, got, p)


def test_the_draw_depends_on_the_ids_not_on_the_column_order():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(5, 12, generator=g, dtype=torch.float64)
    ids_rows, ids_cols = torch.tensor([3, 7, 0, 11, 5]), torch.randperm(12, generator=g)
    u = torch.rand(5, generator=g, dtype=torch.float64)
    picked = ids_cols[hard_negatives(sim, ids_rows, ids_cols, u)]
    perm = torch.randperm(12, generator=g)
    again = ids_cols[perm][hard_negatives(sim[:, perm], ids_rows, ids_cols[perm], u)]
    assert torch.equal(picked, again)
    assert not (picked == ids_rows).any()


def test_large_similarities_never_pick_the_positive():
    """A positive far above every negative (logit gap 200: exp underflows in float32) still yields a negative."""
    sim = torch.full((4, 4), -100.0)
    sim.fill_diagonal_(100.0)
    ids = torch.arange(4)
    for u in (0.0, 0.5, 0.999999):
        picks = hard_negatives(sim, ids, ids, torch.full((4,), u))
        assert not (picks == ids).any(), (u, picks)


def test_draws_are_a_function_of_seed_and_step():
    assert torch.equal(draws(3, 10, 8), draws(3, 10, 8))
    assert not torch.equal(draws(3, 10, 8), draws(3, 11, 8))
    assert not torch.equal(draws(3, 10, 8), draws(4, 10, 8))
    assert torch.equal(draws(3, 10, 16)[:, :8], draws(3, 10, 8))  # (a larger batch extends the same stream)


def test_attach_returns_the_head_weights_from_forward_and_detach_gives_open_clips_model():
    torch.manual_seed(0)
    model = build(ModelConfig()).model
    plain_keys = set(model.state_dict())
    line = itm.attach(model, 128, 16)
    assert "ITM head: 384 -> 16 -> 1" in line and itm.has_head(model)
    assert set(model.state_dict()) == plain_keys | {
        f"itm_head.{k}" for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }
    images, text = torch.randn(3, 3, 32, 32), open_clip.get_tokenizer("clipkit-tiny")(["a 1", "a 2", "a 3"])
    out = model(images, text)
    head = out["itm_head"]
    assert [w.shape for w in head] == [(16, 384), (16,), (1, 16), (1,)]
    sum(w.sum() for w in head).backward()
    assert model.itm_head.fc1.weight.grad is not None  # (views: the gradient reaches the parameters)
    logits = model.itm_head(out["image_features"], out["text_features"])
    u, v = out["image_features"], out["text_features"]
    x = torch.cat([128**0.5 * u, 128**0.5 * v, 128 * u * v], 1)
    want = model.itm_head.fc2(torch.nn.functional.gelu(model.itm_head.fc1(x)))[:, 0]
    torch.testing.assert_close(logits, want)
    itm.detach(model)
    assert type(model) is open_clip.CLIP and not itm.has_head(model)
    assert set(model.state_dict()) == plain_keys
    assert "itm_head" not in model(images, text)


def test_the_head_learns_to_tell_pairs_from_drawn_negatives():
    """Embeddings whose pairs are correlated (cosine about 0.4), negatives drawn as in training: after 200 AdamW
    steps the head classifies over 85% of the pairs right (the prior, "no match" everywhere, is 2/3). Fed the
    normalised embeddings unscaled, it was still at 2/3 after 200 steps."""
    from clipkit.loss.itm import ITMLoss

    torch.manual_seed(0)
    head = itm.FusionHead(128, 128)
    opt = torch.optim.AdamW(head.parameters(), lr=7e-4, weight_decay=0.2)
    loss = ITMLoss(1.0, seed=0)
    for step in range(1, 201):
        img = torch.nn.functional.normalize(torch.randn(128, 128), dim=1)
        txt = torch.nn.functional.normalize(img + 0.21 * torch.randn(128, 128), dim=1)
        term = loss.at(step, None, 128, torch.device("cpu"))
        value = term(img, txt, torch.tensor(30.0), head.weights())
        opt.zero_grad()
        value.backward()
        opt.step()
    assert term.logged["itm_accuracy"] > 0.85, term.logged


def _brute_force_ranks(sim, own, logit, k):
    """Per query: the k most similar items (ties: the query's correct items first), ordered by ITM logit, then the
    rank of the first correct item; none among them: its similarity rank (1 + the items strictly more similar)."""
    out = []
    for q in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda c: (-sim[q, c].item(), not own[q, c]))
        top = order[:k]
        hits = [c for c in top if own[q, c]]
        if hits:
            best = max(logit(q, c) for c in hits)
            out.append(1 + sum(1 for c in top if logit(q, c) > best))
        else:
            best_sim = max(sim[q, c].item() for c in range(sim.shape[1]) if own[q, c])
            out.append(1 + sum(1 for c in range(sim.shape[1]) if sim[q, c].item() > best_sim))
            assert out[-1] > k
    return out


def test_rerank_metrics_match_a_brute_force_count():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    owner = torch.arange(30).repeat_interleave(2)  # two captions per image
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(60, 8, generator=g), dim=1)
    head = itm.FusionHead(8, 12)
    weights = tuple(w.detach() for w in head.weights())
    k = 5
    got = itm_rerank_metrics(img, txt, owner, weights, k, chunk=7)
    assert itm_rerank_metrics(img, txt, owner, weights, k, budget_bytes=2000) == got  # (5 and 11 queries a chunk)

    def logit(a, b):
        return itm.score(a[None], b[None], weights).item()

    i2t = _brute_force_ranks(
        img @ txt.T, owner[None, :] == torch.arange(30)[:, None], lambda q, c: logit(img[q], txt[c]), k
    )
    t2i = _brute_force_ranks(
        txt @ img.T, torch.arange(30)[None, :] == owner[:, None], lambda q, c: logit(img[c], txt[q]), k
    )
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for kk in (1, 5, 10):
            assert got[f"itm_{name}_R@{kk}"] == pytest.approx(sum(r <= kk for r in ranks) / len(ranks))
        assert got[f"itm_{name}_mean_rank"] == pytest.approx(sum(ranks) / len(ranks))
    plain = retrieval_metrics(img, txt, owner)
    assert got["itm_image_to_text_R@10"] == plain["image_to_text_R@10"]  # (only the top 5 moved)
    assert got["itm_image_to_text_R@5"] == plain["image_to_text_R@5"]  # (recall inside the top k is kept)
    assert got["itm_text_to_image_R@1"] != plain["text_to_image_R@1"]  # (an untrained head does reorder)


def test_a_correct_item_tied_at_the_kth_similarity_is_a_candidate():
    """Identical captions (the same text, the same embedding) tie in similarity: plain retrieval ranks the image's
    own caption first among them, so re-ranking must see it among its candidates, not whichever tied caption
    topk happened to keep (it had ranked most images' own captions k + 1)."""
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    txt = torch.nn.functional.normalize(torch.ones(6, 8), dim=1)  # six copies of one caption
    weights = tuple(w.detach() for w in itm.FusionHead(8, 4).weights())
    for k in (1, 2, 4):
        got = itm_rerank_metrics(img, txt, torch.arange(6), weights, k)
        assert got["itm_image_to_text_R@1"] == retrieval_metrics(img, txt, torch.arange(6))["image_to_text_R@1"] == 1.0


def test_the_run_report_plots_the_itm_curves_of_a_run_that_logged_them(tmp_path):
    from clipkit.report import write_report

    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "logit_scale": 14.0, "grad_norm": 1.0} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    page = write_report(tmp_path).read_text()
    assert 'alt="training loss"' in page and "ITM" not in page
    for r in rows:
        r.update(itm_loss=0.6, itm_accuracy=0.7)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    page = write_report(tmp_path).read_text()
    assert 'alt="ITM term (unweighted; loss.itm_weight)"' in page
    assert 'alt="ITM head accuracy on its pairs (prior 2/3)"' in page


def test_init_from_loads_a_head_of_the_same_shape_and_starts_a_fresh_one_otherwise(tmp_path):
    from safetensors.torch import save_file

    from clipkit.model import build_for_training

    torch.manual_seed(0)
    src = build(ModelConfig()).model
    itm.attach(src, 128, 16)
    with torch.no_grad():
        src.itm_head.fc2.bias.fill_(3.0)
    weights = {k: v.contiguous() for k, v in src.state_dict().items()}
    with_head, without = tmp_path / "head.safetensors", tmp_path / "plain.safetensors"
    save_file(weights, str(with_head))
    save_file(itm.split(weights)[0], str(without))

    def start(path, width):
        built, said = build_for_training(ModelConfig(init_from=str(path)), "cpu", width)
        assert torch.equal(built.model.visual.conv1.weight, src.visual.conv1.weight)  # (the towers, always)
        return built.model, said

    model, said = start(with_head, 16)
    assert model.itm_head.fc2.bias.item() == 3.0 and any("ITM head loaded from" in line for line in said)
    model, said = start(with_head, 8)  # another width: a fresh head
    assert model.itm_head.fc1.weight.shape == (8, 384) and not any("loaded" in line for line in said)
    model, said = start(without, 16)
    assert model.itm_head.fc2.bias.item() != 3.0 and not any("loaded" in line for line in said)
    model, _ = start(with_head, None)  # no ITM in this run: the file's head is left out
    assert not itm.has_head(model)
