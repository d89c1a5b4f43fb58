"""PyTorch-native fully sharded data parallel (FSDP2, ``parallel=fsdp``), a sibling of the local, DDP and ZeRO
engines.

- Sharding: ``fully_shard`` on every transformer block of both towers (``ResidualAttentionBlock``), then on the
  root (the embeddings, projections, final norms and the 0-d temperature/bias, held as 1-element vectors because
  FSDP2 shards along dim 0). ``parallel.reshard_after_forward`` trades memory for a second all-gather in
  backward; ``parallel.offload_optimizer`` keeps parameters, gradients and optimizer state in CPU memory
  (``CPUOffloadPolicy``).
- ``train.compile``: each block's forward is compiled before ``fully_shard`` (see ``parts.Forward``); the root's
  few layers (patch embedding, projections) run eagerly.
- Precision: with bf16 each block's parameters are cast to bf16 for compute by FSDP's ``MixedPrecisionPolicy``,
  gradients are reduced in fp32 and the optimizer updates fp32 shards (master weights). The root unit (embeddings,
  final norms, projections, the temperature and bias) keeps fp32 parameters and runs under autocast, as DDP's
  whole model does: its matmuls run in bf16, while ``exp(logit_scale)`` stays fp32 (a bf16 temperature would
  round 100.003 to 99.0, and the bias's -10 to steps of 0.06). fp32 runs without a policy.
- Gradient caching: the K-1 first re-forwards run with gradient synchronisation off (``no_sync``: unsharded
  gradients accumulate locally), the last reduce-scatters the sum once, which is what DDP does; the result equals
  one process on the whole batch (tests/integration/test_engines.py).
- Checkpoints: model and optimizer through torch.distributed.checkpoint (``dcp/``, each rank writes its shards; no
  pickled code is loaded back), resharded on load when the number of ranks changed; the schedule in
  ``engine.pt`` (loaded with ``weights_only``); the consolidated ``model.safetensors`` that eval, export and
  ``model.init_from`` read without FSDP. ``train.async_checkpoint=true`` writes all of it in the background
  (``save``).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from clipkit import checkpoint as ckpt
from clipkit import ema as ema_lib
from clipkit import lora
from clipkit.distributed import ensure_process_group
from clipkit.engine.parts import (
    Forward,
    TorchUpdate,
    as_scalars,
    autocast_dtype,
    hold_scalars_as_vectors,
    with_scalar_outputs,
)

if TYPE_CHECKING:
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv

DCP_DIR = "dcp"


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of both towers, the units FSDP shards one by one."""

    return [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, CustomResidualAttentionBlock))]


class FSDPEngine:
    def __init__(self, model: torch.nn.Module, cfg: RootConfig, env: DistEnv):
        ensure_process_group(env, cfg.parallel.timeout_s)  # (a single process too: DTensors need a group)
        self.model, self.device, self.rank = model, env.device, env.rank
        amp = autocast_dtype(cfg.train.precision, env.device)
        self.amp_dtype = amp
        # Blocks: bf16 compute copies of fp32 shards; the root: fp32 parameters under autocast (module docstring).
        block_policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
        root_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        options = {"offload_policy": CPUOffloadPolicy()} if cfg.parallel.offload_optimizer else {}
        self.scalar_names = hold_scalars_as_vectors(model, hooks=False)
        blocks = _blocks(model)
        # train.compile: each block compiled before it is sharded (torch's documented order: activation
        # checkpointing, then compile, then fully_shard), so FSDP's hooks run eagerly around the compiled blocks.
        self._forward = Forward(model, env.device, amp, False, cfg.train.compile == "model", compile_blocks=blocks)
        for block in blocks:
            fully_shard(
                block,
                mp_policy=block_policy if amp else MixedPrecisionPolicy(),
                reshard_after_forward=cfg.parallel.reshard_after_forward,
                **options,
            )
        # The root stays gathered from its forward to its backward (FSDP's own default for a root): the model
        # returns ``logit_bias`` itself, whose storage a reshard would free before the loss reads it.
        fully_shard(
            model, mp_policy=root_policy if amp else MixedPrecisionPolicy(), reshard_after_forward=False, **options
        )
        # Clip, finite check, AdamW on the fp32 shards, schedule, temperature clamp (each rank clamps its own shard
        # of the 1-element temperature): the same update as the replicated engines (no fp16 scaler: refused).
        # train.ema_decay: the average of this rank's fp32 shards (sharded like the parameters; DCP reshards it).
        self.ema = ema_lib.build(cfg, lambda: {n: p.to_local() for n, p in ema_lib.trainable(model).items()})
        self.update = TorchUpdate(model, cfg, env.device, amp_dtype=None, ema=self.ema)
        self.optimizer, self.scheduler = self.update.optimizer, self.update.scheduler
        # Asynchronous saves talk over their own group, so that they never interleave with the training's
        # collectives (creating a group is itself a collective: every rank does it here, in the same order).
        self.checkpoint_group = dist.new_group(backend="gloo") if cfg.train.async_checkpoint else None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipkit-dcp")

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        out = self._forward(images, text)
        return with_scalar_outputs(out)

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        torch.autograd.backward(outputs, grads)

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.update.step()  # the norm is global (clipping reduces it over the shards)

    @property
    def lr(self) -> float:
        return self.update.lr

    @contextlib.contextmanager
    def full_params(self):
        """The root's parameters unsharded (the blocks unshard themselves when called), for eval, under the
        training's autocast (the blocks' unsharded copies are bf16 under a bf16 policy; the root's stay fp32)."""
        self.model.unshard()
        cast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        try:
            with cast:
                yield
        finally:
            self.model.reshard()

    @contextlib.contextmanager
    def ema_weights(self):
        """``full_params`` over the EMA weights (each rank swaps its own shards in; the unshard gathers them)."""
        with self.ema.swapped(), self.full_params():
            yield

    def _ema_dtensors(self) -> dict:
        """The EMA shards as DTensors laid out like their parameters (sharing the shards' storage)."""
        params = ema_lib.trainable(self.model)
        return {
            name: DTensor.from_local(
                local,
                params[name].device_mesh,
                params[name].placements,
                run_check=False,
                shape=params[name].shape,
                stride=params[name].stride(),
            )
            for name, local in self.ema.shadow.items()
        }

    def ema_copy(self, name: str) -> torch.Tensor | None:
        return self._ema_dtensors().get(name) if self.ema else None

    def consolidated_ema(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 EMA weights with open_clip's names and shapes on rank 0 (a collective); None elsewhere."""
        full = {name: t.full_tensor().cpu() for name, t in self._ema_dtensors().items()}
        if self.rank != 0:
            return None
        return as_scalars(full, self.scalar_names)

    def consolidated_weights(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 weights with open_clip's names and shapes on rank 0 (a collective); None elsewhere."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        if self.rank != 0:
            return None
        return as_scalars(lora.saved_weights(self.model, weights), self.scalar_names)

    def save(self, path: Path, background: bool = False) -> Future | None:
        """Shards through torch DCP, the consolidated weights and the schedule. With ``background``
        (``train.async_checkpoint``) only the copy of the state is synchronous: DCP's ``async_save`` writes the
        shards from a background thread over its own process group, and the consolidated weights (already
        gathered to host memory) are written after them; the returned future completes when all is on disk."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": lora.saved_weights(self.model, model_state), "optim": optim_state}
        weights = self.consolidated_weights()  # a collective; host copies on rank 0
        ema_weights, ema_state = None, self.ema.state() if self.ema else None
        if self.ema:
            ema_weights = self.consolidated_ema()  # a collective
            # (async: DCP stages its own copy before returning; the EMA moves on only after that)
            state["ema"] = self._ema_dtensors()
        if self.rank == 0:
            ckpt.save_torch(path / "engine.pt", {"scheduler": self.scheduler.state_dict()})

        def write_consolidated() -> None:
            if weights is not None:
                ckpt.save_tensors(path / "model.safetensors", weights)
            if ema_weights is not None:
                ema_lib.save_files(path, ema_weights, ema_state)

        if not background:
            dcp.save(state, checkpoint_id=str(path / DCP_DIR))
            write_consolidated()
            return None
        shards = dcp.async_save(state, checkpoint_id=str(path / DCP_DIR), process_group=self.checkpoint_group)

        def finish() -> None:
            shards.result()
            write_consolidated()

        return self._writer.submit(finish)

    def load(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        # (model.lora: the frozen base weights are not in the checkpoint; they are in place already)
        state = {"model": lora.saved_weights(self.model, model_state), "optim": optim_state}
        if self.ema:
            state["ema"] = self._ema_dtensors()  # loaded in place into the EMA's shards
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))  # reshards when the number of ranks changed
        options = StateDictOptions(strict=not lora.is_adapted(self.model))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=options,
        )
        self.scheduler.load_state_dict(ckpt.load_torch(path / "engine.pt")["scheduler"])
        if self.ema:
            self.ema.load_state(ckpt.load_json(path / ema_lib.STATE_FILE))
