"""Captioning metrics (clipkit.eval.captioning) against a corpus BLEU-4 written here from its definition, and
CIDEr's defining properties."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from clipkit.eval.captioning import caption_scores, words


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu4(candidates: list[str], references: list[list[str]]) -> float:
    """Papineni et al.: clipped n-gram precisions summed over the corpus, their geometric mean, and the brevity
    penalty against each candidate's closest reference length (ties: the shorter)."""
    correct, total, cand_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for cand, refs in zip(candidates, references, strict=True):
        c, rs = cand.split(), [r.split() for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            counts = ngrams(c, n)
            best = Counter()
            for r in rs:
                best |= ngrams(r, n)
            correct[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    precision = math.exp(sum(math.log(correct[n] / total[n]) for n in range(4)) / 4)
    return precision * (math.exp(1 - ref_len / cand_len) if cand_len < ref_len else 1.0)


CANDIDATES = [
    "a photo of a red circle on a dark background",
    "two blue squares at the top",
    "a big green triangle",
]
REFERENCES = [
    ["a photo of a red circle", "a red circle on a dark background", "one red circle, dark background"],
    ["two blue squares at the top of the image", "a pair of blue squares"],
    ["a large green triangle in the middle", "a green triangle"],
]


def test_bleu4_matches_its_definition():
    got = caption_scores(CANDIDATES, REFERENCES)
    refs = [[words(r) for r in rs] for rs in REFERENCES]
    assert got["BLEU-4"] == pytest.approx(corpus_bleu4(CANDIDATES, refs), rel=1e-6)
    assert got["num_captioned"] == 3


def test_a_caption_equal_to_its_references_scores_one_and_cider_ranks_it_first():
    refs = [["a big red circle"], ["two small blue squares"]]
    exact = caption_scores(["a big red circle", "two small blue squares"], refs)
    assert exact["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    near = caption_scores(["a big red square", "two small blue squares"], refs)
    unrelated = caption_scores(["seven", "eight"], refs)
    assert exact["CIDEr"] > near["CIDEr"] > unrelated["CIDEr"] == 0.0


def test_words_lowercases_and_drops_punctuation_alike_for_both_sides():
    assert words("A Five-pointed STAR, yellow!") == "a five-pointed star yellow"
    same = caption_scores(["A big, red circle."], [["a big red circle"]])
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_images_without_references_are_left_out():
    got = caption_scores(["a big red circle", "anything"], [["a big red circle"], []])
    assert got["num_captioned"] == 1 and got["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        caption_scores(["one"], [])
