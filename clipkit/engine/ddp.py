"""torch DistributedDataParallel: the model replicated, gradients averaged over the ranks during backward (so every
rank computes the same gradient norm and takes the same branch of the finite check)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel

from clipkit.engine.parts import Replicated

if TYPE_CHECKING:
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv


class DDPEngine(Replicated):
    def __init__(self, model: torch.nn.Module, cfg: RootConfig, env: DistEnv):
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        super().__init__(model, self.ddp, cfg, env)

    def no_sync(self):
        return self.ddp.no_sync()  # gradient caching's first K-1 backward passes accumulate locally
