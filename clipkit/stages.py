"""``train.stages`` at run time (the config side: ``stage_config``).

The image tower keeps one position embedding, of its own (the model's) grid, the whole run, so no parameter
changes shape: the engine, the optimizer state, the EMA and the checkpoints stay as they are across a switch.

- In a stage of another image size the tower adds the embedding interpolated to that stage's grid (bicubic with
  antialiasing, what open_clip's ``resize_pos_embed`` does to load weights at another size): the forward is
  exactly that of a model built at the stage's size holding the interpolated embedding.
- At the end of such a stage the embedding is replaced by the stage's own one interpolated back to the model's
  grid, so the next stage starts from what the last one trained (a small-image stage trains only what its grid
  can see; the finer detail of the full-size embedding, never trained there, would otherwise come back at the
  switch). The EMA's copy is replaced the same way. The optimizer's moments are kept. Under FSDP the embedding and
  its EMA copy are DTensors: gathered whole, rewritten, and each rank's shard written back.
- Patch dropout is set per stage (the tower gets a patch-dropout layer if any stage drops patches).
- The loader's resize follows: ``TrainLoader.set_image_size`` restarts its workers from the step's position.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch.distributed.tensor import DTensor, distribute_tensor

from clipkit.stage_config import Stage


def resize_grid(pos: torch.Tensor, grid_from: int, grid_to: int) -> torch.Tensor:
    """A ViT position embedding (class token first, then a grid_from x grid_from grid, row-major) for a
    grid_to x grid_to grid: the grid part interpolated bicubically with antialiasing, the class token's kept."""
    if grid_from == grid_to:
        return pos
    token, cells = pos[:1], pos[1:]
    width = cells.shape[-1]
    cells = cells.reshape(1, grid_from, grid_from, width).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=(grid_to, grid_to), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([token, cells.permute(0, 2, 3, 1).reshape(grid_to * grid_to, width)])


def _embeds_any_size(self, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer._embeds`` for an image of any size that is a multiple of the patch: the
    position embedding resized to the image's grid (the model's own grid: the embedding itself)."""
    x = self.conv1(x)  # [batch, width, grid, grid]
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)  # [batch, grid ** 2, width]
    token = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([token, x], dim=1)
    x = x + resize_grid(self.positional_embedding, self.grid_size[0], grid).to(x.dtype)
    x = self.patch_dropout(x)
    return self.ln_pre(x)


class Stages:
    """Holds the run's stages and applies them to the model (before any engine wraps it) and at each switch."""

    def __init__(self, stages: list[Stage], model: torch.nn.Module):
        self.stages, self.model = stages, model
        visual = model.visual
        self.patch = visual.patch_size[0]
        self.native = visual.grid_size[0]
        visual._embeds = types.MethodType(_embeds_any_size, visual)
        if any(s.patch_dropout > 0 for s in stages) and not isinstance(visual.patch_dropout, PatchDropout):
            visual.patch_dropout = PatchDropout(0.0)

    def at(self, step: int) -> Stage:
        """The stage that trains step ``step`` (1-based; past the end, the last)."""
        return next((s for s in self.stages if step <= s.end), self.stages[-1])

    def describe(self, step: int) -> str:
        """The run log's line for the stage of step ``step``."""
        return self.at(step).describe(len(self.stages))

    def switches_after(self, step: int) -> bool:
        """Step ``step`` ends a stage that another follows (never the run's last step: the last stage follows
        none)."""
        return any(s.end == step for s in self.stages[:-1])

    def enter(self, stage: Stage) -> None:
        """The model's side of a stage: its patch dropout (its image size is the input's)."""
        dropout = self.model.visual.patch_dropout
        if isinstance(dropout, PatchDropout):
            dropout.prob = stage.patch_dropout

    @torch.no_grad()
    def carry_over(self, stage: Stage, ema_copy: torch.Tensor | None) -> None:
        """At the end of ``stage``: the embedding it trained (the model's, interpolated to its grid), interpolated
        back to the model's grid, in the parameter and in the EMA's copy (whole tensors, or FSDP's DTensors:
        gathered, rewritten, and each rank's shard written back)."""
        grid = stage.grid(self.patch)

        def carried(t: torch.Tensor) -> torch.Tensor:
            return resize_grid(resize_grid(t.float(), self.native, grid), grid, self.native).to(t.dtype)

        for t in (self.model.visual.positional_embedding, ema_copy):
            if t is None:
                continue
            if isinstance(t, DTensor):
                t.copy_(distribute_tensor(carried(t.full_tensor()), t.device_mesh, t.placements))
            else:
                t.copy_(carried(t))
