"""Several processes, one per GPU (or CPU processes with gloo), through torch.distributed.

`workbench run --gpus N` relaunches itself under torchrun; every process runs the recipe.
Training (`train.fit`) wraps the model in DistributedDataParallel and shards the batches;
the sensitivity sweep splits its configurations across processes and gathers one table.
Only rank 0 writes the run directory: the other ranks write into a throwaway folder.
Without torchrun's environment every helper here is a no-op, so single-process code
paths stay as they are.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from .errors import WorkbenchError


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); each rank takes its own GPU."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of `items` (every world_size-th, starting at its rank)."""
    return items[rank() :: world_size()]


def gather_dict(part: dict) -> dict:
    """Merge every rank's dict (keys are disjoint) into one, on every rank."""
    if not active():
        return part
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `python -m workbench <argv>` in `nproc` processes with torchrun; its exit code."""
    if nproc > 1 and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise WorkbenchError(f"--gpus {nproc}: this machine has {torch.cuda.device_count()} GPU(s)")
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "workbench", *argv])
    except SystemExit as e:  # torchrun exits with the workers' code
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError: a rank failed; its message is already on stderr
        print(f"error: a process of the {nproc}-process run failed ({type(e).__name__})", file=sys.stderr)
        return 1
    return 0
