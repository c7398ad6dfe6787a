"""Multi-process training through torch.distributed (launched by ``torchrun``).

``setup()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and initialises the
process group (``nccl`` on GPU, ``gloo`` on CPU); a plain ``python`` run is rank 0 of 1.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup() -> tuple[int, int]:
    """(rank, world size), initialising the default process group when launched by torchrun."""
    if world_size() <= 1:
        return 0, 1
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        tdist.init_process_group(backend)
    return tdist.get_rank(), tdist.get_world_size()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel in a multi-process run, else ``model`` itself."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
