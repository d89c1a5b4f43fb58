"""EMA weights (``train.ema_decay``): an fp32 exponential moving average of the trainable parameters.

The average is kept where each engine keeps the parameters themselves, so it costs one fp32 copy of what a rank
already holds and no communication per step: the replicated engines (one process, DDP, ZeRO-1/2) average the
whole tensors, FSDP its local shards, ZeRO-3 its flat partitions. The engine hands ``EMA`` those local tensors
(``sources``); after every *applied* update the average moves toward them (a skipped non-finite step moves
nothing, and is not counted; the decision and the count stay on the device, like the optimizer's skip).
Locked parameters never change, so they are not averaged: the EMA weights are the average for what trains and
the parameters themselves for the rest (and for buffers).

Decay with ``train.ema_warmup``: ``min(decay, 1 - (1 + n) ** -2/3)`` at the n-th update (timm's and diffusers'
warm-up with gamma 1, power 2/3), so the average is not dominated by the random initialisation in short runs;
without it, ``decay`` from the first update.

Checkpoints: the engine saves ``shadow`` the way it saves its parameters (whole, sharded through DCP, or per
partition), with ``state()`` (the update count) in ``ema.json``, and always adds the consolidated
``ema.safetensors`` (open_clip's names and shapes, trainable parameters only) that ``clipkit eval``
(``eval.use_ema``) and ``clipkit export weights=ema`` read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from clipkit import checkpoint as ckpt
from clipkit.checkpoint import listed

EMA_FILE = "ema.safetensors"
STATE_FILE = "ema.json"
SUFFIX = "_ema"  # eval results of the EMA weights: NAME_ema beside NAME


class EMA:
    """``sources()`` returns the engine's local storage of the trainable parameters, by open_clip name (asked
    for at every use: an engine may replace those tensors, e.g. DeepSpeed when it loads a checkpoint)."""

    def __init__(self, sources: Callable[[], dict[str, torch.Tensor]], decay: float, warmup: bool):
        self.sources, self.decay, self.warmup = sources, decay, warmup
        with torch.no_grad():
            self.shadow = {name: t.detach().float().clone() for name, t in sources().items()}
        device = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        self._count = torch.zeros((), dtype=torch.float64, device=device)  # applied updates, on the device

    @property
    def updates(self) -> int:
        """Applied updates so far (a host read of the device counter)."""
        return int(self._count.item())

    def decay_at(self, n: int) -> float:
        """The decay of the n-th update (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + n) ** (-2.0 / 3.0))

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """After an optimizer step: shadow += (1 - d_n) * (param - shadow), in fp32, where ``applied`` (a device
        bool; None: it was) says the update was applied; a skipped one moves nothing and is not counted. All on
        the device: the decay of the n-th applied update comes from a device counter."""
        flag = torch.ones((), device=self._count.device) if applied is None else applied.to(self._count.device)
        self._count += flag.to(self._count.dtype)
        if not self.shadow:
            return
        if self.warmup:
            decay = torch.clamp(1.0 - (1.0 + self._count) ** (-2.0 / 3.0), max=self.decay)
        else:
            decay = torch.full_like(self._count, self.decay)
        weight = ((1.0 - decay) * flag).float()
        sources = self.sources()
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [sources[n].float() for n in names], weight)

    @contextlib.contextmanager
    def swapped(self):
        """The parameters hold the EMA weights inside the context (eval), their own values again after it."""
        sources = self.sources()
        with torch.no_grad():
            saved = {name: t.detach().clone() for name, t in sources.items()}
            for name, t in sources.items():
                t.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in sources.items():
                    t.copy_(saved[name])

    def state(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state(self, state: dict, shadow: dict[str, torch.Tensor] | None = None) -> None:
        self._count.fill_(int(state["updates"]))
        if shadow is not None:
            missing = set(self.shadow) - set(shadow)
            if missing:
                raise KeyError(f"EMA weights missing from the checkpoint: {sorted(missing)[:5]}")
            with torch.no_grad():
                for name, t in self.shadow.items():
                    t.copy_(shadow[name].reshape(t.shape))


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the EMA averages (open_clip names): those that train."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def build(cfg, sources: Callable[[], dict[str, torch.Tensor]]) -> EMA | None:
    """``train.ema_decay`` > 0: an EMA over ``sources`` (the engine's local storage of the trainable parameters)."""
    if cfg.train.ema_decay <= 0:
        return None
    return EMA(sources, cfg.train.ema_decay, cfg.train.ema_warmup)


def ema_weights(path: Path) -> Path | None:
    """The consolidated EMA weights of a checkpoint dir, if it has them (by its manifest: a file added later is
    not the checkpoint's)."""
    f = Path(path) / EMA_FILE
    return f if f.is_file() and listed(path, EMA_FILE) else None


def save_files(path: Path, weights: dict[str, torch.Tensor], state: dict) -> None:
    """Main rank: the consolidated EMA weights and ``EMA.state()`` (the update count)."""
    ckpt.save_tensors(Path(path) / EMA_FILE, weights)
    ckpt.save_json(Path(path) / STATE_FILE, state)


def load_files(
    path: Path, device: torch.device | str = "cpu", weights: str = EMA_FILE
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state, weights) of a checkpoint dir written with EMA on: the consolidated weights, or another file of
    them (ZeRO-3: a rank's own partitions)."""
    return ckpt.load_json(Path(path) / STATE_FILE), ckpt.load_tensors(Path(path) / weights, device)


def with_ema(weights: dict[str, torch.Tensor], ema_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict whose trainable parameters are the EMA's (locked ones and buffers as they are)."""
    unknown = set(ema_weights) - set(weights)
    if unknown:
        raise KeyError(f"EMA weights not in the model: {sorted(unknown)[:5]}")
    return {k: ema_weights[k].to(v.dtype).reshape(v.shape) if k in ema_weights else v for k, v in weights.items()}
