"""The one Accelerator constructor both stages use: right rank bookkeeping on every backend, and
the launch facts that must be settled before an Accelerator exists.

Without a GPU, accelerate leaves its own process count at 1 under DeepSpeed unless the process
group is created with the gloo backend through its kwargs handler (TRAPS.md): both ranks would
then act as main and read the same data. The handler is given only under a multi-process launch
(WORLD_SIZE > 1): in a plain `python -m ...` process accelerate would otherwise query a process
group that does not exist, and fail. After construction, accelerate's view is checked against
torch.distributed's, so any remaining drift is a loud error instead of silent duplicate work.

A launch config's `deepspeed_config_file` reaches the process as written and accelerate reads it
relative to the working directory; gqaru's configs name theirs from the project root
(`launch/deepspeed/zero2.json`), so a relative path missing from the working directory is looked
up there before accelerate reads it: the launch configs work from any directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""Where launch/ lives in a checkout; relative DeepSpeed JSON paths are also looked up here."""


class RankBookkeepingError(RuntimeError):
    """accelerate and torch.distributed disagree on the processes: work would be duplicated or lost."""


class LaunchConfigError(RuntimeError):
    """A launch setting cannot work as given; the message names it and the fix."""


def pin_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (`runtime.torch_threads`) before any work. CPU kernels split
    their reductions by thread count, so a pinned count gives the same bytes run after run on the
    same machine kind, whatever OMP_NUM_THREADS or the core count say."""
    if threads is not None:
        torch.set_num_threads(threads)


def describe_torch_threads(threads: int | None) -> str:
    """The start-up log's phrase for the thread count in use and where it came from."""
    if threads is not None:
        return f"torch threads {torch.get_num_threads()} (pinned: runtime.torch_threads={threads})"
    return f"torch threads {torch.get_num_threads()} (torch's default; runtime.torch_threads pins it)"


def is_deepspeed_launch() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (the Accelerator will use it)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def launched_device_type() -> str:
    """The device type the Accelerator will give this process, known before it exists.

    Precision has to be decided before the Accelerator is built under DeepSpeed (TRAPS.md);
    `make_accelerator` callers compare it with `accelerator.device` afterwards.
    """
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_deepspeed_config_file() -> None:
    """Point accelerate at the launch config's DeepSpeed JSON from any working directory.

    Raises:
        LaunchConfigError: the file is neither where the path says nor under the project root.
    """
    value = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not value.endswith(".json"):
        return  # unset, "none", or an inline/base64 config: accelerate's business
    path = Path(value).expanduser()
    if path.is_file():
        resolved = path.resolve()
    elif not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        resolved = PROJECT_ROOT / path
    else:
        raise LaunchConfigError(
            f"deepspeed_config_file {value!r} of the launch config is missing: not in the working directory "
            f"{Path.cwd()} nor under the project root {PROJECT_ROOT}. Give an absolute path "
            "(accelerate launch --deepspeed_config_file /path/zero2.json) or fix the launch config"
        )
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(resolved)


def deepspeed_json() -> dict[str, Any] | None:
    """The DeepSpeed JSON this launch names (found as `resolve_deepspeed_config_file` finds it),
    or None when the launch gives none (not DeepSpeed, or a config accelerate builds itself)."""
    resolve_deepspeed_config_file()
    value = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not is_deepspeed_launch() or not value.endswith(".json"):
        return None
    return json.loads(Path(value).read_text(encoding="utf-8"))


def make_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` with the DeepSpeed JSON found, the gloo fix on CPU launches and the
    consistency check.

    Raises:
        LaunchConfigError: the launch config's DeepSpeed JSON is missing.
        RankBookkeepingError: accelerate and torch.distributed disagree on the processes.
    """
    resolve_deepspeed_config_file()
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
