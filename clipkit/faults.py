"""Fault injection for the reliability suite (``tests/reliability``); inert unless ``CLIPKIT_FAULTS`` is set.

``CLIPKIT_FAULTS`` is a ``;``-separated list of ``ACTION[:POINT]@STEP[/RANK]``:

  kill:POINT@S     SIGKILL this process at POINT of step S (points below)
  sigterm:POINT@S  send this process SIGTERM (``sigusr1:``: SIGUSR1) at POINT of step S
  nan_loss@S       the loss of step S is NaN
  inf_grad@S       the loss of step S is finite but its gradient is infinite
  spike_loss@S     the loss of step S is 20x its value (a loss spike)
A fault fires once; ``@S+`` fires at step S and at every step after it.

Points: ``save_start`` (temporary dir created), ``save_shards`` (every rank: its own files written, or copied
for a background write), ``save_written`` (all files written, no manifest yet),
``save_manifest`` (manifest written, not yet renamed into place), ``save_done`` (renamed, not yet pruned),
``eval`` (before a periodic eval), ``embed_part`` (``clipkit embed``: after part S-1 is written), ``step``
(after the update of step S), ``skip`` (when the loop reads that step S
was skipped as non-finite: at the next log, checkpoint, eval or stop).
``/RANK`` limits a fault to one rank (default: every rank). Steps are 1-based, as in ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fault:
    action: str
    point: str | None
    step: int
    rank: int | None
    repeat: bool = False


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        what, _, where = item.partition("@")
        action, _, point = what.partition(":")
        step, _, rank = where.partition("/")
        repeat = step.endswith("+")
        faults.append(Fault(action, point or None, int(step.rstrip("+")), int(rank) if rank else None, repeat))
    return faults


FAULTS = parse(os.environ.get("CLIPKIT_FAULTS", ""))
_FIRED: set[Fault] = set()


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _matching(action: str, point: str | None, step: int) -> bool:
    for f in FAULTS:
        at_step = step >= f.step if f.repeat else step == f.step
        if f.action == action and f.point == point and at_step and f.rank in (None, _rank()):
            if f in _FIRED and not f.repeat:
                continue
            _FIRED.add(f)
            return True
    return False


def at(point: str, step: int) -> None:
    """Kills or signals this process if a fault is planned for ``point`` of ``step``."""
    if not FAULTS:
        return
    if _matching("kill", point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _matching("sigterm", point, step):
        os.kill(os.getpid(), signal.SIGTERM)
    if _matching("sigusr1", point, step):
        os.kill(os.getpid(), signal.SIGUSR1)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def loss_hook(loss_fn, current_step):
    """``loss_fn``, corrupted at the planned steps (``current_step()`` gives the step being computed)."""
    if not any(f.action in ("nan_loss", "inf_grad", "spike_loss") for f in FAULTS):
        return loss_fn

    def wrapped(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        step = current_step()
        if _matching("nan_loss", None, step):
            loss = loss * float("nan")
        if _matching("inf_grad", None, step):
            loss = _InfGrad.apply(loss)
        if _matching("spike_loss", None, step):
            loss = loss * 20
        return loss

    return wrapped
