"""Write planned shards in parallel: worker processes on one machine, or torchrun ranks across nodes.

Each worker or rank writes whole shard files, so the output is byte-identical whatever the
number of processes. Under torchrun (`WORLD_SIZE` > 1 in the environment) rank r writes the
shards whose index modulo the world size is r into a staging directory on a filesystem all ranks
share; rank 0 plans, writes everything else and renames the directory into place.

NOTE: the plan reaches worker processes and ranks as a pickle (multiprocessing arguments,
`broadcast_object_list`). Nothing pickled is written to disk or read from outside the export's
own processes, but a rank trusts what rank 0 sends. Rebuilding the plan on each rank from the
checkpoint's metadata would avoid it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from speechlm_bridge.errors import SpeechLMBridgeError
from speechlm_bridge.export.safetensors_writer import ShardPlan, write_shard

logger = logging.getLogger(__name__)

# The other ranks wait in a broadcast while rank 0 plans. Planning reads metadata, but the tie
# check also hashes the embedding table and the LM head, which on a slow network filesystem may
# outlast the 30-minute default timeout of torch.distributed (2.13).
_GROUP_TIMEOUT = timedelta(hours=2)


def write_shards(
    shards: list[ShardPlan], directory: Path, *, indices: list[int], workers: int = 1, progress: bool | None = False
) -> int:
    """Write `shards[i]` for each i in `indices` into `directory`; return the bytes written.

    With `workers` > 1 the shards are spread over that many spawned processes, each writing
    whole files.
    """
    if workers < 1:
        raise SpeechLMBridgeError(f"--workers must be at least 1, got {workers}")
    todo = [shards[index] for index in indices]
    if workers == 1 or len(todo) <= 1:
        return sum(write_shard(shard, directory, progress=progress) for shard in todo)

    # spawn, not fork: the parent has run torch ops and owns thread pools that fork would copy
    # in an undefined state.
    context = multiprocessing.get_context("spawn")
    # A pool, not a ProcessPoolExecutor, because a pool can terminate its workers: an error,
    # Ctrl-C or SIGTERM then stops the shards being written instead of waiting for them.
    pool = context.Pool(processes=min(workers, len(todo)), initializer=_init_worker)
    try:
        results = [pool.apply_async(write_shard, (shard, directory), {"progress": progress}) for shard in todo]
        return sum(result.get() for result in results)
    finally:
        pool.terminate()
        pool.join()


def _init_worker() -> None:
    import torch

    # Each worker mostly copies bytes; one thread each keeps N workers from oversubscribing N cores.
    torch.set_num_threads(1)


@dataclass
class ExportGroup:
    """The torchrun process group of a distributed export (gloo, CPU only)."""

    rank: int
    world_size: int
    owns_process_group: bool
    shared: bool = False

    @classmethod
    def from_env(cls) -> ExportGroup | None:
        """Join the process group torchrun describes; None when `WORLD_SIZE` is unset or 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return None
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo", timeout=_GROUP_TIMEOUT)
        group = cls(rank=dist.get_rank(), world_size=dist.get_world_size(), owns_process_group=owns)
        logger.info("distributed export: rank %d of %d", group.rank, group.world_size)
        return group

    def indices(self, shard_count: int) -> list[int]:
        """Return the shard indices this rank writes."""
        return list(range(self.rank, shard_count, self.world_size))

    def share(self, message: Any) -> Any:
        """Send `message` from rank 0 to every rank; return what rank 0 sent."""
        import torch.distributed as dist

        payload = [message if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        if self.rank == 0:
            self.shared = True
        return payload[0]

    def gather_errors(self, error: str | None) -> list[str]:
        """Collect every rank's error message (None when it succeeded); return the failures."""
        import torch.distributed as dist

        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        return [f"rank {rank}: {message}" for rank, message in enumerate(errors) if message is not None]

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
