"""Data-parallel training under `torchrun`: one process per rank, PyTorch's own
DistributedDataParallel, no scheduler of ours.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; `session()` starts the
process group from them (NCCL for CUDA tensors where each rank has a GPU of its own, gloo
for CPU tensors and for ranks that share a GPU) and does nothing without them, so the
single-process path is untouched. Every helper here is a no-op in one process.

The rules the trainers follow:
- `batch_size` is the GLOBAL batch. Every rank draws the same batch order and the same
  augmentation from the shared seeded generator and keeps its contiguous slice
  (`Shard.take`); the loss of each slice is weighted by its share of the batch, so the
  averaged gradient is the gradient of one process with the same batch. The learning rate
  is unchanged.
- BatchNorm: SyncBatchNorm on CUDA (statistics over the global batch). On CPU (gloo)
  torch has no SyncBatchNorm, so each rank normalises with the statistics of its own slice;
  the running statistics are rank 0's (broadcast before each forward and every epoch end).
- Rank 0 alone writes files and events; the others wait for it where a later step reads
  what it wrote (`barrier`, `on_main`), and take its reading of a file it may alone see
  (`main_value`).
- Collectives time out after ASYMKD_DIST_TIMEOUT_MIN minutes (default 30): a rank that
  died or hangs ends the job with `RankFailure` instead of a silent hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import distributed as dist
from torch import nn

from ..errors import AsymKDError, ConfigError
from ..events import Events
from ..launch import launched

TIMEOUT_ENV = "ASYMKD_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0
T = TypeVar("T")


class RankFailure(AsymKDError):
    """Another rank died, or a collective operation timed out."""


def timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks (ASYMKD_DIST_TIMEOUT_MIN)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MIN
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < 1e6:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a positive number of minutes",
                          f"set it to e.g. 30, or unset it for the default ({DEFAULT_TIMEOUT_MIN:g})")
    return datetime.timedelta(minutes=minutes)


def backend(local_world: int = 1) -> str:
    """gloo for CPU tensors; for CUDA tensors NCCL where each of this machine's
    `local_world` ranks has a GPU of its own, else gloo (NCCL refuses two ranks on one GPU,
    as when two ranks share a machine's only GPU)."""
    if not torch.cuda.is_available():
        return "gloo"
    return "cpu:gloo,cuda:nccl" if local_world <= torch.cuda.device_count() else "gloo"


def active() -> bool:
    """Whether this process is one of several ranks of a started process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and events."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device without an index is the GPU of this rank's LOCAL_RANK."""
    launch = launched()
    if device.type == "cuda" and device.index is None and launch is not None and launch.world > 1:
        return torch.device("cuda", _local_gpu(launch.local_rank))
    return device


def _local_gpu(local_rank: int) -> int:
    """The GPU index of a local rank (ranks share GPUs round-robin when they outnumber them)."""
    return local_rank % torch.cuda.device_count()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Start the process group for a torchrun launch (a no-op without one) and end it;
    a failed collective becomes a `RankFailure` that names this rank."""
    launch = launched()
    if launch is None or launch.world <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_gpu(launch.local_rank))
    try:
        dist.init_process_group(backend(launch.local_world), timeout=timeout())
    except (RuntimeError, ValueError) as exc:
        raise RankFailure(f"rank {launch.rank}: cannot join the other {launch.world - 1} processes: {exc}",
                          "start every rank with the same torchrun rendezvous (--rdzv-endpoint, --nnodes)") from None
    try:
        yield
    except RuntimeError as exc:
        if not _from_collective(exc):
            raise
        raise RankFailure(f"rank {launch.rank}: a collective operation failed, another rank died or stopped "
                          f"answering: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          f"see the other ranks' errors above; a slow step may need a longer {TIMEOUT_ENV}") from exc
    finally:
        dist.destroy_process_group()


def _from_collective(exc: RuntimeError) -> bool:
    """Whether an error comes from the process group (gloo raises plain RuntimeErrors)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "nccl", "c10d", "Timed out"))


# -- the global batch ----------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This rank's contiguous slice of every global batch."""

    rank: int = 0
    world: int = 1

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else t.tensor_split(self.world)[self.rank]

    def weight(self, n: int) -> float:
        """Weight of this slice's mean loss so that the ranks' average is the batch mean."""
        if self.world == 1:
            return 1.0
        return self.world * len(self.take(torch.empty(n, 0))) / n


def shard() -> Shard:
    return Shard(rank(), world())


def check_split(batch_sizes: list[int], n_samples: int, step: str) -> None:
    """Refuse a launch where some rank would get no sample of a batch (on every rank alike)."""
    w = world()
    if n_samples < w:
        raise ConfigError(f"{step}: {w} processes (torchrun world size) for {n_samples} training samples",
                          "start at most as many processes as there are training samples "
                          "(torchrun --nproc_per_node / --nnodes)")
    if batch_sizes and min(batch_sizes) < w:
        raise ConfigError(f"{step}: a global batch of {min(batch_sizes)} samples cannot be split over {w} "
                          "processes (batch_size is the global batch)",
                          f"raise batch_size to at least {2 * w}, or start fewer processes")


# -- collectives (each a no-op in one process) --------------------------------------------
def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a step's files)."""
    if active():
        dist.barrier()


def from_main(value: T) -> T:
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


def broadcast_(*tensors: torch.Tensor) -> None:
    """Overwrite the tensors with rank 0's, in place."""
    if active():
        for t in tensors:
            dist.broadcast(t, src=0)


def all_mean(values: list[float]) -> list[float]:
    """The mean over ranks of each number."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world()).tolist()


def sync_buffers(modules: dict[str, nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if active():
        broadcast_(*[b for m in modules.values() for b in m.buffers()])


def main_value(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn`'s result on rank 0, on every rank: rank 0 alone runs it (e.g. reads a file that
    only it is sure to see), so every rank decides alike."""
    return from_main(fn(*args, **kwargs) if is_main() else None)  # type: ignore[return-value]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run `fn` on rank 0 only; every rank returns once it has finished (its files exist)."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


# -- the model -----------------------------------------------------------------------
class _TaskModules(nn.Module):
    """A task's modules as one module whose forward runs the task's batch: DDP sees one
    forward per step, whichever methods of the modules the task calls."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def data_parallel(modules: dict[str, nn.Module], batch_terms: Callable[..., dict[str, torch.Tensor]],
                  unused_parameters: bool = False) -> Callable[..., dict[str, torch.Tensor]]:
    """`batch_terms` run through DistributedDataParallel: gradients averaged over ranks.
    On CUDA the BatchNorm layers become SyncBatchNorm (in place: same parameters)."""
    # a 1x1 convolution's gradient may come in another (equally dense) layout than its
    # bucket: DDP copies it and says so once per process; nothing to act on
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    wrapper = _TaskModules(modules)
    device = next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        for m in modules.values():
            nn.SyncBatchNorm.convert_sync_batchnorm(m)
    ddp = nn.parallel.DistributedDataParallel(
        wrapper, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=unused_parameters)

    def run(*args: Any) -> dict[str, torch.Tensor]:
        return ddp(batch_terms, *args)

    return run


# -- output --------------------------------------------------------------------------
class _Silent(Events):
    """The events of a rank other than 0: nothing on any stream, no terminal lines."""

    def __init__(self) -> None:
        super().__init__(stream=None, progress_bars=False)

    def log(self, message: str, level: str = "info") -> None:
        pass

    def warning(self, message: str) -> None:
        pass


def rank_events(events: Events) -> Events:
    """`events` on rank 0 (and in one process); silent events on every other rank."""
    return events if is_main() else _Silent()
