"""Captioning with CoCa models: greedy decoding (``clipkit caption`` and the retrieval evaluator use it) and the
captioning metrics on a retrieval set: each image's greedy caption (``clipkit.caption``) against
the set's captions of that image as references, scored with the COCO caption toolkit's BLEU-4 and CIDEr
(``pycocoevalcap``; its CIDEr is the CIDEr-D that COCO reports).

The COCO toolkit tokenises with the Stanford PTB tokenizer, which needs Java; clipkit lower-cases and splits on
anything that is not a letter, a digit, a hyphen or an apostrophe instead (``words``), the same for candidates
and references. Figures are comparable between clipkit runs, and close to but not exactly the COCO server's.

Decoding is greedy (the most likely next token until the end-of-text token or the model's context length),
written here over the CoCa's towers and decoder as its ``forward`` chains them (``visual``, ``text``,
``text_decoder``), not through the root ``forward``: under FSDP2 the root's post-forward hook reshards what eval's
``full_params`` unsharded, and the next decoding step fails.

open_clip 3.3's own ``CoCa.generate`` needs ``transformers`` < 4.56 (it imports ``BeamSearchScorer``, which 4.57
and 5.x no longer export) and asserts otherwise. Greedy decoding is deterministic: an exported model gives the
same captions in open_clip (tested with a greedy loop over open_clip's model; with transformers 4.55,
``generate(generation_type="top_k", top_k=1)`` agrees too).
"""

from __future__ import annotations

import contextlib
import io
import re

import torch

_WORD = re.compile(r"[a-z0-9'\-]+")
SOT, EOT = 49406, 49407  # open_clip's SimpleTokenizer's start/end of text


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


def greedy_captions(
    model, images: torch.Tensor, max_tokens: int | None = None, pad_id: int = 0, synchronous: bool = False
) -> torch.Tensor:
    """[N, T] token ids (start token first; after a caption's end token: ``pad_id``), greedy, without autograd.
    ``synchronous``: always ``max_tokens`` steps, not stopping when every caption has ended (several ranks of a
    sharded model must make the same forward calls)."""
    max_tokens = min(max_tokens or model.context_length, model.context_length)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, image_embs = model.visual(images)  # (the image tower once: its tokens, which the decoder attends to)
        out = torch.full((images.shape[0], 1), SOT, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        while out.shape[1] < max_tokens and (synchronous or not bool(done.all())):
            _, token_embs = model.text(out)
            nxt = model.text_decoder(image_embs, token_embs)[:, -1].argmax(dim=-1)
            if out.shape[1] == max_tokens - 1:
                nxt = torch.full_like(nxt, EOT)  # the last place ends the caption
            nxt = nxt.masked_fill(done, pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOT
    model.train(was_training)
    return out


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    """The text of each row of ``greedy_captions``: the tokens between the start and the end token."""
    texts = []
    for row in ids.tolist():
        body = row[1:]
        body = body[: body.index(EOT)] if EOT in body else body
        texts.append(" ".join(tokenizer.decode(body).split()))
    return texts
