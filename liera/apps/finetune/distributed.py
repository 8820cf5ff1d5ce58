"""torchrun support of `liera finetune`: joining the process group, and leaving it when finetune created it."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

_OWN_GROUP = False  # whether finetune created the process group (then it also tears it down)


def leave_process_group() -> None:
    """Destroy a process group finetune created: left alive, gloo's threads abort the process at exit."""
    global _OWN_GROUP
    if not _OWN_GROUP:
        return
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()  # no rank leaves while rank 0 is still writing
        dist.destroy_process_group()
    _OWN_GROUP = False


def join_process_group() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPU, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        global _OWN_GROUP
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _OWN_GROUP = True
    return dist.get_rank(), world
