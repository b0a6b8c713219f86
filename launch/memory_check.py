"""Before a run allocates anything: will it fit in this machine's memory?

`civetta train` starts every rank of a layout on this machine. Before it does, the cost model
projects what each rank will hold (`parallel.cost.projection.device_memory_of`: the traced
model's parameters, gradients and optimizer state as the layout shards them, and the
activations its pieces keep for backward) and adds them up over the ranks. A run that needs more
than the memory the operating system reports available is refused with one line, instead of
failing inside a rank with MemoryError after start-up.

The arrays are what the engine really allocates: bf16 and fp16 are emulated on float32 arrays,
so they are counted as float32 here, with the float32 master weights beside them. The projection
leaves out what is not the model's (the interpreter, MPI's buffers, numpy's temporaries), so it
is a floor: a run it passes may still run short, a run it refuses cannot fit.
"""

from __future__ import annotations

import os
from pathlib import Path

from launch.config import ExperimentConfig, model_description
from parallel.cost.projection import Workload, device_memory_of

GIB = 2**30
EMULATED = ("bf16", "fp16")  # float32 arrays rounded to the simulated dtype


class MemoryCheckError(ValueError):
    """The run cannot fit in this machine's memory; one line for the user."""


def available_bytes() -> int | None:
    """Memory the OS could give this job now (Linux MemAvailable), or None if unknown."""
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def projected_bytes(config: ExperimentConfig) -> int:
    """What every rank of the run holds together, as the engine allocates it."""
    layout, model = config.layout, model_description(config)
    dtype = config.train.dtype
    work = Workload("float32" if dtype in EMULATED else dtype, config.train.optimizer)
    total = 0
    for device in range(layout.pp):
        rank = device_memory_of(model, layout, device, work)
        total += rank.total
        if dtype in EMULATED:  # float32 masters of the weights, sharded as the optimizer state
            total += rank.params // layout.dp if layout.zero in (1, 2) else rank.params
    return total * layout.dp * layout.tp


def check_memory(config: ExperimentConfig, available: int | None = None) -> None:
    """Refuse a run whose ranks cannot fit in this machine's available memory."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    need = projected_bytes(config)
    if need > available:
        ranks = config.layout.world_size
        raise MemoryCheckError(
            f"the run needs at least {need / GIB:.1f} GiB of memory on this machine "
            f"({ranks} rank{'s' if ranks > 1 else ''}: model state and activations, as the cost "
            f"model projects them), but {available / GIB:.1f} GiB are available; make the model "
            "or the batch smaller, or shard it further (parallel.zero, parallel.recompute)"
        )
