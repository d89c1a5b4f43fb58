"""Captioning metrics for CoCa models on a retrieval set: each image's greedy caption (``clipkit.caption``) against
the set's captions of that image as references, scored with the COCO caption toolkit's BLEU-4 and CIDEr
(``pycocoevalcap``; its CIDEr is the CIDEr-D that COCO reports).

The COCO toolkit tokenises with the Stanford PTB tokenizer, which needs Java; clipkit lower-cases and splits on
anything that is not a letter, a digit, a hyphen or an apostrophe instead (``words``), the same for candidates
and references. Figures are comparable between clipkit runs, and close to but not exactly the COCO server's.
"""

from __future__ import annotations

import contextlib
import io
import re

_WORD = re.compile(r"[a-z0-9'\-]+")


def words(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict:
    """``{"BLEU-4", "CIDEr", "num_captioned"}`` over the corpus: candidate i is scored against references[i]."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    keep = [i for i, refs in enumerate(references) if refs]
    gts = {i: [words(r) for r in references[i]] for i in keep}
    res = {i: [words(candidates[i])] for i in keep}
    if not keep:
        return {"BLEU-4": 0.0, "CIDEr": 0.0, "num_captioned": 0}
    with contextlib.redirect_stdout(io.StringIO()):  # (the toolkit prints its counts)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider), "num_captioned": len(keep)}
