"""The one Accelerator constructor both stages use: right rank bookkeeping on every backend.

Without a GPU, accelerate leaves its own process count at 1 under DeepSpeed unless the process
group is created with the gloo backend through its kwargs handler (TRAPS.md): both ranks would
then act as main and read the same data. The handler is given only under a multi-process launch
(WORLD_SIZE > 1): in a plain `python -m ...` process accelerate would otherwise query a process
group that does not exist, and fail. After construction, accelerate's view is checked against
torch.distributed's, so any remaining drift is a loud error instead of silent duplicate work.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


class RankBookkeepingError(RuntimeError):
    """accelerate and torch.distributed disagree on the processes: work would be duplicated or lost."""


def make_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` with the gloo fix on CPU launches and the consistency check."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not torch.cuda.is_available():
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(**kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if world != accelerator.num_processes or rank != accelerator.process_index:
            raise RankBookkeepingError(
                f"accelerate sees {accelerator.num_processes} process(es) (index {accelerator.process_index}) but "
                f"torch.distributed has {world} (rank {rank}): refusing to run with inconsistent rank bookkeeping"
            )
    return accelerator
