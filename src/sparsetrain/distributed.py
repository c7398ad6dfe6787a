"""Multi-process training through torch.distributed (launched by ``torchrun``).

``setup()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and initialises the
process group (``nccl`` on GPU, ``gloo`` on CPU); a plain ``python`` run is rank 0 of 1.

    torchrun --nproc_per_node 4 -m sparsetrain train --method linbreg --out runs/x
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 \
        -m sparsetrain train ...

How the trainer keeps a multi-process run equal to one process on the same global batch:

* every global batch of ``--batch-size`` samples is split between ranks (``TensorLoader``); each
  rank's loss is its share of the global mean, so DDP's gradient average is the global gradient
  even for unequal shards; the logged loss (and the NaN/inf check) is the global batch's, on
  every rank at once;
* everything computed from weights and averaged gradients (Bregman subgradients, xRDA averages,
  RigL masks, λ controllers, pruning masks) is then identical on every rank; gradients of
  optimizer parameters outside the DDP module (e.g. HALO's scales) are averaged by hand;
  buffers (BatchNorm statistics) are rank 0's at the end of every epoch; ``check_in_sync``
  verifies after every epoch that weights, optimizer and method state agree across ranks;
* rank 0 alone touches the run directory (validates and writes ``--out``; reads the checkpoint
  on ``--resume`` and broadcasts it, so other nodes need not see the directory); a failure on
  one rank (bad --out, missing data, disk full) stops every rank with the same exit code
  (:func:`agree`), and only one of them prints the message;
* every rank evaluates the full test set (identical weights, identical numbers).

Models with BatchNorm compute batch statistics per shard (plain DDP behaviour), so they are not
bit-for-bit the single-process run; their weights still agree across ranks.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.distributed as tdist
from torch import nn

from .errors import UsageError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


_OWNED = False      # True when setup() created the process group (then teardown() destroys it)


def setup(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size), initialising the default process group when launched by torchrun.

    A process group that already exists (a user's own ``init_process_group``) is used as is.
    The backend follows the training device: ``nccl`` for CUDA, ``gloo`` otherwise."""
    global _OWNED
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    if world_size() <= 1:
        return 0, 1
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(device if device is not None and device.index is not None else local_rank())
    tdist.init_process_group("nccl" if cuda else "gloo")
    _OWNED = True
    return tdist.get_rank(), tdist.get_world_size()


def is_multi() -> bool:
    """True inside an initialised process group of more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def agree(fn: Callable[[], object] | None) -> None:
    """Run ``fn`` on this rank (None: nothing to do here) and agree on the outcome across ranks.

    If ``fn`` raised on any rank, every rank raises, so that no rank waits forever in a later
    collective: a failing rank its own exception (rank 0's failure wins over the others'), the
    other ranks a copy of it: a :class:`UsageError` marked ``quiet`` (the CLI prints only the
    unquiet one, so the user reads one line) or a RuntimeError naming the failed rank."""
    err = None
    if fn is not None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            if not is_multi():
                raise
            err = e
    if not is_multi():
        return
    msgs: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(msgs, None if err is None else (isinstance(err, UsageError), str(err)))
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if not failed:
        return
    if err is not None and (msgs[0] is None or tdist.get_rank() == 0):
        raise err                        # this rank reports its own failure
    rank, (usage, text) = failed[0]      # else rank 0's (or the lowest failing rank's) failure
    if usage:
        quiet = UsageError(text)
        quiet.quiet = True               # printed once, by the failing rank
        raise quiet
    raise RuntimeError(f"distributed: rank {rank} failed ({text[:300]}); stopping this rank too")


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_multi():
        return obj
    box = [obj if tdist.get_rank() == 0 else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics ...) to every rank."""
    if is_multi():
        for b in model.buffers():
            tdist.broadcast(b, src=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (``t`` itself in a single process)."""
    if is_multi():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over ranks (for parameters outside the DDP module)."""
    if not is_multi():
        return
    w = tdist.get_world_size()
    for p in params:
        if p.grad is not None:
            tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)
            p.grad.div_(w)


def _fingerprint(t: torch.Tensor) -> list[float]:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    f = t.to(torch.float64)
    return [f.sum().item(), f.abs().sum().item(), float(torch.count_nonzero(t))]


def check_in_sync(tensors: dict[str, torch.Tensor]) -> None:
    """Raise RuntimeError on every rank if the named tensors (weights, masks, optimizer and
    method state) differ between ranks; a no-op in a single process."""
    if not is_multi():
        return
    names = sorted(tensors)
    mine = [_fingerprint(tensors[n]) for n in names]
    everyone: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, (names, mine))
    for r, (their_names, theirs) in enumerate(everyone):
        if their_names != names:
            raise RuntimeError(f"distributed: rank {r} holds other state than rank {tdist.get_rank()} "
                               f"({sorted(set(their_names) ^ set(names))[:5]})")
        bad = [n for n, a, b in zip(names, mine, theirs)
               if any(x != y and not (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))]
        if bad:
            raise RuntimeError(f"distributed: ranks {tdist.get_rank()} and {r} drifted apart in "
                               f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel in a multi-process run, else ``model`` itself."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def teardown() -> None:
    """Wait for every rank, then destroy the process group if :func:`setup` created it."""
    global _OWNED
    if tdist.is_available() and tdist.is_initialized() and _OWNED:
        tdist.barrier()
        tdist.destroy_process_group()
        _OWNED = False
