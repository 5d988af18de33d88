"""Where a process runs: its rank and the world under ``torchrun``, barriers, and the device it uses
(as detectron2's ``utils/comm.py``). Every module asks here; none keeps a copy."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import PatchnetError


class DeviceError(PatchnetError, RuntimeError):
    """A device asked for that this machine does not have."""


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def get_rank() -> int:
    """This process's rank (0 outside ``torchrun``)."""
    return rank_world()[0]


def get_world_size() -> int:
    """The number of processes (1 outside ``torchrun``)."""
    return rank_world()[1]


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes what all share (meta files, tables, checkpoints)."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every process (nothing outside ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over the processes (in place; the tensor itself outside ``torchrun``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def init_distributed() -> None:
    """Join the process group when started by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str = "auto") -> torch.device:
    """``runtime.device``: auto (CUDA when present; under torchrun this process's GPU), cpu, cuda or cuda:N."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available; use runtime.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's own message lists every backend it knows: name the usual ones instead
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N (e.g. cuda:0)") from None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision``, or None for fp32. ``auto``: bf16 on CUDA where supported (else fp16),
    bf16 on CPUs with native bf16 (avx512_bf16 or AMX), fp32 on other CPUs."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16() else None


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX); without it bf16 is emulated, slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
