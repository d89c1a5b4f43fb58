"""One training step: ``train_step(engine, loss_fn, micro_batches) -> StepResult``.

Read top to bottom: forward (plain, or gradient-cached over K micro-batches), loss, backward, then the engine's
update, which clips, checks that the global gradient norm is finite and applies the update only then.

Host synchronisation: none. The engine's finite check is decided on the device (a NaN/inf loss on any rank makes
the reduced gradients, hence every rank's norm, non-finite, so every rank decides alike without a collective).
The loss, the norm, the temperature and whether the update was applied come back as device tensors; the loop
reads them when it logs, and enforces ``train.nonfinite`` then.

Gradient caching (GradCache) lets a rank contribute K micro-batches to one global batch of negatives:
  1. forward every micro-batch without autograd and keep only the embeddings (cheap in memory);
  2. compute the loss on all K*B local rows at once (against every rank's columns) and its gradient with
     respect to the embeddings, the temperature and the bias;
  3. re-forward each micro-batch with autograd and backpropagate its slice of the cached embedding gradient;
     the temperature and bias receive their gradient once, on the last micro-batch (re-forwarding K times
     must not give them K times their gradient, as open_clip's accumulation does);
  4. the engine synchronises gradients across ranks only on the last micro-batch (no_sync before).
Randomness inside the model (patch dropout) is replayed: each re-forward runs under the RNG state its
no-grad forward saw, so both passes see the same model. A fully locked tower (``model.lock_image`` /
``model.lock_text``) is not re-forwarded at all: its cached embeddings are final and need no gradient.
The result equals one process computing the loss on the whole K*W*B batch (tested in float64).

Cached features (``data.cache_*_features``): a micro-batch's images (or token ids) are then the locked tower's
embeddings (B x D floats); ``model_forward`` runs the other tower alone and hands them on. A cached teacher
(``data.cache_teacher_features``) reads its embeddings from the batch's third element.

The objective's other terms come as one ``Terms`` (each None when off).

Distillation (``teacher``): the teacher's outputs for each micro-batch are computed once, without autograd (in
the no-grad pass when caching), and handed to the loss beside the student's.

Compiled (``train.compile=step``, ``CompiledStep``): the same ``forward_backward`` and the engine's clip, check,
update and clamp (``TorchUpdate.apply``) run as one torch.compile'd call; dropping the gradients, the schedule
and the EMA (``finish``) stay eager around it.

ITM (``itm``, ``loss/itm.py``): the step's image-text matching term, on the same embeddings as the contrastive
loss (the cached ones, when caching) with the fusion head's weights, which the model's forward returns beside the
temperature; like the temperature they receive their whole gradient once, on the last micro-batch.

CoCa (``caption``): the model also returns next-token logits and their labels; the captioning term is per sample,
so each forward that keeps autograd adds its micro-batch's share (``loss/caption.py``), normalised by the global
batch's token count, counted once per step. Under caching both towers are re-forwarded even when one is locked:
the caption decoder reads both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clipkit.optim import IMAGE, TEXT, tower_of

log = logging.getLogger("clipkit")

# (normalised images, token ids[, the teacher's token ids when it has its own tokenizer])
Batch = tuple[torch.Tensor, ...]
# (image_features, text_features, logit_scale, logit_bias[, teacher=outputs]) -> scalar
LossFn = Callable[..., torch.Tensor]
Teacher = Callable[..., dict]  # (images, text[, teacher text]) -> image_features, text_features, logit_scale
Caption = Callable[..., torch.Tensor]  # loss.caption.CaptionLoss: (logits, labels, count) -> this rank's share
ITM = Callable[..., torch.Tensor]  # loss.itm.ITMTerm: (image_features, text_features, logit_scale, head) -> scalar


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's loss over its rows (detached, on the device)
    grad_norm: torch.Tensor  # global pre-clip gradient norm (on the device)
    logit_scale: torch.Tensor  # the temperature the loss used (detached, on the device)
    applied: torch.Tensor  # (a device bool) False: the norm was not finite and nothing was applied
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # more scalars for the log (the ITM term's)


@dataclass(frozen=True)
class Terms:
    """The objective's terms beside the contrastive loss, each None when off: distillation's teacher, CoCa's
    captioning term, this step's image-text matching term."""

    teacher: Teacher | None = None
    caption: Caption | None = None
    itm: ITM | None = None


NO_TERMS = Terms()


def train_step(engine, loss_fn: LossFn, micro_batches: list[Batch], terms: Terms = NO_TERMS) -> StepResult:
    loss, out = forward_backward(engine, loss_fn, micro_batches, terms)
    grad_norm, applied = engine.step()  # clip; apply only if the global norm is finite
    return StepResult(loss, grad_norm, out["logit_scale"].detach(), applied)


class CompiledStep:
    """``train_step`` under ``train.compile=step``, for the replicated engines (one process, DDP) with one
    micro-batch per step (config validation refuses the rest).

    Dynamo makes a graph of the forward and loss (AOTAutograd compiles its backward beside it), and one of the
    clip, finite check and AdamW update (``optim.masked_adamw_``, the learning rate a tensor); it breaks only at
    ``backward``, which autograd runs. Compilation happens at the first call and fails loudly: a step that half
    ran cannot be replayed in eager mode on the same random numbers (``train.compile=model`` falls back instead).
    """

    def __init__(self, engine):
        self.engine, self.update = engine, engine.update
        self.compiled = torch.compile(self._traced)
        self.checked = False

    def _traced(self, loss_fn: LossFn, batch: Batch, terms: Terms):
        loss, out = forward_backward(self.engine, loss_fn, [batch], terms)
        norm, applied, finite = self.update.apply()
        return loss, norm, out["logit_scale"].detach(), applied, finite

    def __call__(self, engine, loss_fn: LossFn, micro_batches: list[Batch], terms: Terms = NO_TERMS) -> StepResult:
        (batch,) = micro_batches
        start = time.perf_counter()
        try:
            loss, norm, scale, applied, finite = self.compiled(loss_fn, batch, terms)
        except Exception as err:  # dynamo / inductor failures surface at the first call
            if self.checked:
                raise
            raise RuntimeError(
                f"train.compile=step: the step did not compile ({type(err).__name__}: {err}); "
                "train.compile=model or false trains this config"
            ) from err
        if not self.checked:
            log.info("torch.compile: the training step compiled (first call %.0f s)", time.perf_counter() - start)
            self.checked = True
        self.update.finish(finite)
        return StepResult(loss, norm, scale, applied)


def step_function(engine, compile: str):
    """The step ``clipkit train`` and ``clipkit bench`` run: ``CompiledStep`` under ``train.compile=step``, else
    ``train_step``."""
    return CompiledStep(engine) if compile == "step" else train_step


def forward_backward(
    engine, loss_fn: LossFn, micro_batches: list[Batch], terms: Terms = NO_TERMS
) -> tuple[torch.Tensor, dict]:
    """Leaves this step's gradients in the engine; returns (detached loss, the last forward's outputs)."""
    if len(micro_batches) > 1:
        return cached_forward_backward(engine, loss_fn, micro_batches, terms)
    teacher, caption, itm = terms.teacher, terms.caption, terms.itm
    ((images, text, *teacher_text),) = micro_batches
    extra = {"teacher": teacher(images, text, *teacher_text)} if teacher else {}
    out = model_forward(engine, images, text)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"), **extra)
    if caption:
        loss = loss + caption(out["logits"], out["labels"], caption.target_count([text]))
    if itm:
        loss = loss + itm(out["image_features"], out["text_features"], out["logit_scale"], out["itm_head"])
    detached = loss.detach()  # (before backward: compiled, it stays in the forward's graph)
    engine.backward([loss])
    return detached, out


def model_forward(engine, images: torch.Tensor, text: torch.Tensor) -> dict:
    """``engine.forward``; ``images`` or ``text`` may instead be a locked tower's cached embeddings (B x D floats in
    place of pixels or token ids, ``data.cache_*_features``): that tower is then skipped and they stand in for its
    output."""
    image_rows, text_rows = images.dim() == 2, text.is_floating_point()
    if not (image_rows or text_rows):
        return engine.forward(images, text)
    out = dict(engine.forward(None if image_rows else images, None if text_rows else text))
    if image_rows:
        out["image_features"] = images
    if text_rows:
        out["text_features"] = text
    return out


def rng_state(device: torch.device) -> dict:
    """This process's torch generators (CPU, and ``device``'s when it is a GPU): what a checkpoint keeps per rank."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def cached_forward_backward(
    engine, loss_fn: LossFn, micro_batches: list[Batch], terms: Terms
) -> tuple[torch.Tensor, dict]:
    """Gradient-cached forward/backward over K micro-batches (see the module docstring)."""
    teacher, caption, itm = terms.teacher, terms.caption, terms.itm
    device = micro_batches[0][0].device
    count = caption.target_count([text for _, text, *_ in micro_batches]) if caption else None
    rng_states, img_parts, txt_parts, teacher_parts = [], [], [], []
    with torch.no_grad():
        for images, text, *teacher_text in micro_batches:
            rng_states.append(rng_state(device))
            out = model_forward(engine, images, text)
            img_parts.append(out["image_features"])
            txt_parts.append(out["text_features"])
            if teacher:  # (no randomness: the replayed RNG states stay the student's)
                teacher_parts.append(teacher(images, text, *teacher_text))
    after_state = rng_state(device)
    extra = {}
    if teacher:
        extra["teacher"] = {
            "image_features": torch.cat([t["image_features"] for t in teacher_parts]),
            "text_features": torch.cat([t["text_features"] for t in teacher_parts]),
            "logit_scale": teacher_parts[-1]["logit_scale"],
        }

    img_all = torch.cat(img_parts).detach().requires_grad_()
    txt_all = torch.cat(txt_parts).detach().requires_grad_()
    scale = out["logit_scale"].detach().requires_grad_()
    bias = out["logit_bias"].detach().requires_grad_() if out.get("logit_bias") is not None else None
    loss = loss_fn(img_all, txt_all, scale, bias, **extra)
    head = []  # (ITM: the fusion head's weights, cached like the temperature)
    if itm:
        head = [w.detach().requires_grad_() for w in out["itm_head"]]
        loss = loss + itm(img_all, txt_all, scale, head)
    loss.backward()
    img_grads = img_all.grad.split([p.shape[0] for p in img_parts])
    txt_grads = txt_all.grad.split([p.shape[0] for p in txt_parts])

    last = len(micro_batches) - 1
    image_locked, text_locked = locked_towers(engine.model)
    skip_image, skip_text = (image_locked, text_locked) if not caption else (False, False)
    captioned = []
    for k, (images, text, *_) in enumerate(micro_batches):
        set_rng_state(rng_states[k], device)
        with engine.no_sync() if k < last else contextlib.nullcontext():
            out_k = engine.forward(None if skip_image else images, None if skip_text else text)
            outputs, grads = [], []
            if caption:
                captioned.append(caption(out_k["logits"], out_k["labels"], count))
                outputs.append(captioned[-1])
                grads.append(torch.ones_like(captioned[-1]))
            for key, locked, grad in (
                ("image_features", image_locked, img_grads),
                ("text_features", text_locked, txt_grads),
            ):
                if not locked:
                    outputs.append(out_k[key])
                    grads.append(grad[k].to(out_k[key].dtype))
            if k == last:  # temperature and bias: their whole gradient, exactly once
                outputs.append(out_k["logit_scale"])
                grads.append(scale.grad.to(out_k["logit_scale"].dtype))
                if bias is not None:
                    outputs.append(out_k["logit_bias"])
                    grads.append(bias.grad.to(out_k["logit_bias"].dtype))
                if head:
                    outputs += out_k["itm_head"]
                    grads += [cached.grad.to(w.dtype) for w, cached in zip(out_k["itm_head"], head, strict=True)]
            engine.backward(outputs, grads)
    set_rng_state(after_state, device)
    if caption:
        loss = loss + sum(c.detach() for c in captioned)
    return loss.detach(), out


def locked_towers(model: torch.nn.Module) -> tuple[bool, bool]:
    """(image tower fully locked, text tower fully locked): no parameter of it requires a gradient."""
    trainable = {tower_of(name) for name, p in model.named_parameters() if p.requires_grad}
    return IMAGE not in trainable, TEXT not in trainable
