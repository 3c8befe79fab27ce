"""This process's place in a `torchrun` launch, read from the environment torchrun sets.

Torch-free, so the command line can decide before any import of torch which rank may open
files (only rank 0 writes: the event file, the run folder); `train.distributed` starts the
process group from the same reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local_rank: int
    local_world: int = 1  # ranks on this machine (LOCAL_WORLD_SIZE)


def launched() -> Launch | None:
    """The torchrun launch this process belongs to (from its environment), or None."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                      int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_RANK and LOCAL_WORLD_SIZE "
                          "must be whole numbers",
                          "start the command with torchrun, which sets them, or unset them") from None


def writes_files() -> bool:
    """Whether this process may write: the only process, or rank 0 of a launch."""
    launch = launched()
    return launch is None or launch.rank == 0
