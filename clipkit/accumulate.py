"""One optimisation step's forward + backward, plain or with gradient caching.

Gradient caching (GradCache) lets a rank contribute K micro-batches to one global batch of negatives:
  1. forward every micro-batch without autograd and keep only the embeddings (cheap in memory);
  2. compute the loss on all K*B local rows at once (against every rank's columns) and its gradient with
     respect to the embeddings, the temperature and the bias;
  3. re-forward each micro-batch with autograd and backpropagate its slice of the cached embedding gradient;
     the temperature and bias receive their gradient once, on the last micro-batch (re-forwarding K times
     must not give them K times their gradient, as open_clip's accumulation does);
  4. the engine synchronises gradients across ranks only on the last micro-batch (no_sync before).
Randomness inside the model (patch dropout) is replayed: each re-forward runs under the RNG state its
no-grad forward saw, so both passes see the same model.
The result equals one process computing the loss on the whole K*W*B batch (tested in float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised images, token ids)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def plain_step(engine, loss_fn, micro_batches: list[Batch]) -> tuple[torch.Tensor, dict]:
    """Forward, loss and backward of a single micro-batch; returns (detached loss, model outputs)."""
    ((images, text),) = micro_batches
    out = engine.forward(images, text)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
    engine.check_finite(loss)
    engine.backward([loss])
    return loss.detach(), out


def cached_step(engine, loss_fn, micro_batches: list[Batch]) -> tuple[torch.Tensor, dict]:
    """Gradient-cached forward/backward over K micro-batches (see the module docstring)."""
    device = micro_batches[0][0].device
    rng_states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for images, text in micro_batches:
            rng_states.append(_rng_state(device))
            out = engine.forward(images, text)
            img_parts.append(out["image_features"])
            txt_parts.append(out["text_features"])
    after_state = _rng_state(device)

    img_all = torch.cat(img_parts).detach().requires_grad_()
    txt_all = torch.cat(txt_parts).detach().requires_grad_()
    scale = out["logit_scale"].detach().requires_grad_()
    bias = out["logit_bias"].detach().requires_grad_() if out.get("logit_bias") is not None else None
    loss = loss_fn(img_all, txt_all, scale, bias)
    engine.check_finite(loss)
    loss.backward()
    img_grads = img_all.grad.split([p.shape[0] for p in img_parts])
    txt_grads = txt_all.grad.split([p.shape[0] for p in txt_parts])

    last = len(micro_batches) - 1
    for k, (images, text) in enumerate(micro_batches):
        _set_rng_state(rng_states[k], device)
        with engine.no_sync() if k < last else contextlib.nullcontext():
            out_k = engine.forward(images, text)
            outputs = [out_k["image_features"], out_k["text_features"]]
            grads = [img_grads[k].to(outputs[0].dtype), txt_grads[k].to(outputs[1].dtype)]
            if k == last:  # temperature and bias: their whole gradient, exactly once
                outputs.append(out_k["logit_scale"])
                grads.append(scale.grad.to(out_k["logit_scale"].dtype))
                if bias is not None:
                    outputs.append(out_k["logit_bias"])
                    grads.append(bias.grad.to(out_k["logit_bias"].dtype))
            engine.backward(outputs, grads)
    _set_rng_state(after_state, device)
    return loss.detach(), out


def make_step(num_micro_batches: int) -> Callable:
    """The step function for K micro-batches per rank (chosen once, not branched on in the loop)."""
    return plain_step if num_micro_batches == 1 else cached_step
