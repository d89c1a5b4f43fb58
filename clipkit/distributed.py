"""Process-group set-up from the launcher's environment, and autograd-aware collectives.

Supported launchers: torchrun / the DeepSpeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master from SLURM_JOB_NODELIST). Nothing set means
a single process and no process group at all.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipkit.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_env() -> dict[str, str]:
    """torchrun-style variables from an ``srun`` task's SLURM variables (one task per GPU)."""
    env = {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": os.environ["SLURM_NTASKS"],
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodelist.split(",")[0].split("[")[0]
        env["MASTER_ADDR"] = first
    if "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000)
    return env


def set_fp32_math(device: torch.device, tf32: bool) -> None:
    """``train.tf32`` on a CUDA device: fp32 matmuls and cuDNN convolutions on TF32 tensor cores, or not. A CPU's
    fp32 math is left as it is (the exactness tests' reference). (``set_float32_matmul_precision``, not the new
    per-backend ``fp32_precision`` flags, which make a later read of ``allow_tf32`` by a library raise.)"""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32


def init(device: str = "auto", timeout_s: int = 600, tf32: bool = True) -> DistEnv:
    """Initialises the default process group when launched distributed; picks the device and backend; sets the
    device's fp32 math (``set_fp32_math``)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(_slurm_env())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device", device, "no CUDA device is visible to this process (train.device=cpu?)")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            "train.device", device, f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    set_fp32_math(dev, tf32)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank, world, local_rank, dev)


def ensure_process_group(env: DistEnv, timeout_s: int) -> None:
    """A process group and the torchrun variables also for a single process (DeepSpeed and FSDP need one). A
    process started without a launcher meets only itself, in an in-memory store: it binds no TCP port. (It took a
    free port before, and two single-process runs starting at once on one machine could be handed the same one,
    the second failing with EADDRINUSE.)"""
    alone = env.world_size == 1 and "MASTER_PORT" not in os.environ
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if env.device.type == "cuda" else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"store": dist.HashStore()} if alone else {}),
        )


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor) -> None:
    """Concatenating all-gather into ``out``: the one place that knows the collective's name per torch version
    (torch 2.14 deprecates ``all_gather_into_tensor`` in favour of ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)


def all_gather_flat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0, without autograd."""
    out = x.new_empty((rank_and_world()[1] * x.shape[0], *x.shape[1:]))
    _all_gather_flat(out, x.contiguous())
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gathered gradient over ranks and returns the local slice."""

    @staticmethod
    def forward(ctx, x_BD: torch.Tensor) -> torch.Tensor:
        return all_gather_flat(x_BD)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        grad_ND = grad_ND.contiguous()
        if dist.get_backend() == "nccl":
            out_BD = grad_ND.new_empty((grad_ND.shape[0] // world, *grad_ND.shape[1:]))
            dist.reduce_scatter_tensor(out_BD, grad_ND)
            return out_BD
        dist.all_reduce(grad_ND)  # gloo has no reduce_scatter: reduce everything, keep our slice
        return grad_ND.chunk(world)[rank].clone()


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``x_BD`` (equal shapes), differentiable; identity without a group."""
    if rank_and_world()[1] == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD)


def flags_of_all_ranks(flag: bool, device: torch.device) -> list[bool]:
    """Every rank's boolean, in rank order (one tiny all-gather)."""
    world = rank_and_world()[1]
    if world == 1:
        return [flag]
    mine = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    return [bool(x) for x in all_gather_flat(mine).tolist()]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died, stalled or timed out."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    markers = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "NCCL", "gloo/transport")
    return isinstance(err, RuntimeError) and any(m in text for m in markers)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
