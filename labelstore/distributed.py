"""Where this process stands among its peers: rank and world size, looked up one way for every stage.

Order: explicit arguments, then an initialised ``torch.distributed`` process group, then the variables that
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), then a single process (rank 0 of 1).
"""

from __future__ import annotations

import os


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size), validated; see the module docstring for where each comes from."""
    if world_size is None or rank is None:
        if _initialized():
            import torch.distributed as dist

            found = dist.get_rank(), dist.get_world_size()
        else:
            found = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return int(rank), int(world_size)


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; the global rank when unset): its device index."""
    return int(os.environ.get("LOCAL_RANK", str(rank_world()[0])))
