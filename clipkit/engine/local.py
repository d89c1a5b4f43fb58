"""One process: the plain model, AdamW and the schedule (``parallel=ddp`` at world size 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clipkit.engine.parts import Replicated

if TYPE_CHECKING:
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv


class LocalEngine(Replicated):
    def __init__(self, model: torch.nn.Module, cfg: RootConfig, env: DistEnv):
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        super().__init__(model, model, cfg, env)
