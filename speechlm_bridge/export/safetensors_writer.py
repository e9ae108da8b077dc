"""Plan safetensors shards from shapes and dtypes, then write each file tensor by tensor.

The plan reproduces what `huggingface_hub.save_torch_state_dict(..., metadata={"format": "pt"})`
writes for the same state dict: the same split into `model.safetensors` or
`model-XXXXX-of-YYYYY.safetensors`, the same index file, and files byte-identical to
`safetensors.torch.save_file`. It needs no tensor values, so every tensor's place in the file is
known before any is read, and the file is filled at those places:
- a tensor whose raw bytes lie in checkpoint files (`TensorRef.byte_ranges`: FSDP2 chunks split
  on dim 0, safetensors entries) and need no cast is copied with `os.copy_file_range` by
  `range_copy`, without passing through the process's memory;
- meanwhile the others are loaded in batches of about `BATCH_BYTES`. A thread loads the next
  batch while the current one is written when both fit in `2 * BATCH_BYTES`.
Peak memory is therefore about the largest loaded tensor or two batches, whichever is larger,
independent of shard and model size.

File layout (safetensors 0.8): an 8-byte little-endian header length, a JSON header padded with
spaces to a multiple of 8 bytes, then the tensor bytes. Tensors are ordered by dtype (the
`SAFETENSORS_DTYPES` order, highest first), then by name, and the header lists them in that order
after `__metadata__`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from speechlm_bridge.checkpoints.lazy import TensorRef, as_ref, prefetch
from speechlm_bridge.checkpoints.safetensors_files import INDEX_FILE, SAFETENSORS_DTYPES
from speechlm_bridge.errors import CheckpointError
from speechlm_bridge.export.range_copy import COPY_THREADS, CopyJob, copy_jobs, preallocate

logger = logging.getLogger(__name__)

FILE_METADATA = {"format": "pt"}
FILENAME_PATTERN = "model{suffix}.safetensors"

# Tensors are loaded in batches of about this many bytes, so that one `dcp.load` call serves many
# small tensors while a batch stays small next to the memory of a model.
BATCH_BYTES = 256 * 1024 * 1024

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES.values())}


@dataclass
class ShardPlan:
    """One output file: its name and its tensors in state-dict order, with output dtypes."""

    filename: str
    tensors: list[tuple[str, TensorRef]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, without the header."""
        return sum(ref.nbytes for _, ref in self.tensors)


def plan_shards(
    state_dict: Mapping[str, torch.Tensor | TensorRef], *, max_shard_size: int
) -> list[ShardPlan]:
    """Split a state dict into shards the way `huggingface_hub.split_torch_state_dict_into_shards` does.

    Tensors are taken in the state dict's order. A tensor larger than `max_shard_size` gets its
    own shard, and a shard is closed when the next tensor would make it exceed `max_shard_size`.
    Only shapes and dtypes are read.
    """
    groups: list[list[tuple[str, TensorRef]]] = []
    current: list[tuple[str, TensorRef]] = []
    current_size = 0
    for name, value in state_dict.items():
        ref = as_ref(value)
        size = ref.nbytes
        if size > max_shard_size:
            groups.append([(name, ref)])
            continue
        if current and current_size + size > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append((name, ref))
        current_size += size
    if current:
        groups.append(current)

    if len(groups) == 1:
        return [ShardPlan(FILENAME_PATTERN.format(suffix=""), groups[0])]
    count = len(groups)
    return [
        ShardPlan(FILENAME_PATTERN.format(suffix=f"-{number:05d}-of-{count:05d}"), tensors)
        for number, tensors in enumerate(groups, start=1)
    ]


def index_json(shards: list[ShardPlan]) -> str | None:
    """Return the text of `model.safetensors.index.json` for a sharded plan, None for one file."""
    if len(shards) == 1:
        return None
    index = {
        "metadata": {"total_size": sum(shard.nbytes for shard in shards), **FILE_METADATA},
        "weight_map": {name: shard.filename for shard in shards for name, _ in shard.tensors},
    }
    return json.dumps(index, indent=2)


def write_index(shards: list[ShardPlan], directory: Path) -> None:
    """Write `model.safetensors.index.json` into `directory` when the plan has several shards."""
    text = index_json(shards)
    if text is not None:
        (directory / INDEX_FILE).write_text(text, encoding="utf-8")


def write_shard(shard: ShardPlan, directory: Path, *, progress: bool | None = False, copy_threads: int = COPY_THREADS) -> int:
    """Write one planned shard into `directory`.

    The file is preallocated and its header written first. Tensors with `byte_ranges` are then
    copied by `copy_threads` threads (see `range_copy`) while this thread loads and writes the
    others batch by batch, each at its planned offset. Returns the bytes written. Raises
    `CheckpointError` when a loaded tensor's shape or dtype differs from what the checkpoint's
    metadata announced.
    """
    entries = _file_order(shard.tensors)
    header = _header(entries)
    path = directory / shard.filename
    jobs, loaded_runs = _layout(entries, data_start=len(header))
    total = len(header) + shard.nbytes
    with open(path, "wb", buffering=0) as handle, tqdm(
        total=total,
        desc=shard.filename,
        unit="B",
        unit_scale=True,
        # Decimal units, as in the log lines and the shard size option.
        unit_divisor=1000,
        # tqdm's None disables the bar unless stderr is a terminal.
        disable=None if progress is None else not progress,
        leave=False,
    ) as bar:
        fd = handle.fileno()
        preallocate(fd, total, path=path)
        _pwrite_all(fd, header, 0)
        bar.update(len(header))
        lock = threading.Lock()

        def advance(count: int) -> None:
            with lock:
                bar.update(count)

        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-copy") as copier:
            copying = None
            if jobs:
                copying = copier.submit(copy_jobs, jobs, fd, threads=copy_threads, on_progress=advance, stop=stop)
            try:
                for offset, run in loaded_runs:
                    _write_loaded(run, fd, offset, advance)
                if copying is not None:
                    copying.result()
            except BaseException:
                # A failed load, or SIGTERM/Ctrl-C while waiting: end the copy now rather than
                # after the whole shard, so that the caller can clean up.
                stop.set()
                raise
    logger.debug("wrote %s (%d tensors, %d bytes, %d copied ranges)", path, len(entries), total, len(jobs))
    return total


def _layout(
    entries: list[tuple[str, TensorRef]], *, data_start: int
) -> tuple[list[CopyJob], list[tuple[int, list[tuple[str, TensorRef]]]]]:
    """Place the tensors: copy jobs for those with byte ranges, runs of consecutive others to load.

    Returns `(jobs, [(file offset, run), ...])`.
    """
    jobs: list[CopyJob] = []
    runs: list[tuple[int, list[tuple[str, TensorRef]]]] = []
    offset = data_start
    previous_loaded = False
    for name, ref in entries:
        ranges = ref.byte_ranges()
        if ranges is not None and sum(length for _, _, length in ranges) == ref.nbytes:
            target = offset
            for source, source_offset, length in ranges:
                jobs.append(CopyJob(Path(source), source_offset, length, target))
                target += length
            previous_loaded = False
        else:
            if not previous_loaded:
                runs.append((offset, []))
            runs[-1][1].append((name, ref))
            previous_loaded = True
        offset += ref.nbytes
    return jobs, runs


def _write_loaded(
    entries: list[tuple[str, TensorRef]], fd: int, offset: int, advance: Callable[[int], None]
) -> None:
    """Load consecutive tensors batch by batch and write them from `offset` on."""
    batches = list(_batches(entries))
    # Reading (DCP's torch.load and copies) and writing both release the GIL, so one loader
    # thread overlaps them.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-loader") as loader:
        pending = loader.submit(_load_batch, batches[0]) if batches else None
        for number, batch in enumerate(batches):
            tensors = pending.result()
            following = batches[number + 1] if number + 1 < len(batches) else None
            overlap = following is not None and _size(batch) + _size(following) <= 2 * BATCH_BYTES
            pending = loader.submit(_load_batch, following) if overlap else None
            for position, (_, ref) in enumerate(batch):
                _pwrite_all(fd, memoryview(tensors[position].reshape(-1).view(torch.uint8).numpy()), offset)
                offset += ref.nbytes
                tensors[position] = None
                advance(ref.nbytes)
            del tensors
            if following is not None and pending is None:
                pending = loader.submit(_load_batch, following)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count


def _load_batch(batch: list[tuple[str, TensorRef]]) -> list[torch.Tensor | None]:
    cache = prefetch(ref for _, ref in batch)
    return [_checked(name, ref, ref.load(cache)).contiguous() for name, ref in batch]


def _size(batch: list[tuple[str, TensorRef]]) -> int:
    return sum(ref.nbytes for _, ref in batch)


def _file_order(tensors: list[tuple[str, TensorRef]]) -> list[tuple[str, TensorRef]]:
    for name, ref in tensors:
        if ref.dtype not in _DTYPE_RANK:
            raise CheckpointError(
                f"{name} has dtype {ref.dtype}, which safetensors cannot store; pass --dtype to cast it."
            )
    return sorted(tensors, key=lambda item: (-_DTYPE_RANK[item[1].dtype], item[0]))


def _header(entries: list[tuple[str, TensorRef]]) -> bytes:
    header: dict[str, object] = {"__metadata__": FILE_METADATA}
    offset = 0
    for name, ref in entries:
        end = offset + ref.nbytes
        header[name] = {"dtype": _DTYPE_NAMES[ref.dtype], "shape": list(ref.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _batches(entries: list[tuple[str, TensorRef]]) -> Iterator[list[tuple[str, TensorRef]]]:
    batch: list[tuple[str, TensorRef]] = []
    size = 0
    for name, ref in entries:
        if batch and size + ref.nbytes > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append((name, ref))
        size += ref.nbytes
    if batch:
        yield batch


def _checked(name: str, ref: TensorRef, tensor: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
        raise CheckpointError(
            f"{name} loaded as {tuple(tensor.shape)} {tensor.dtype}, but the checkpoint's metadata gives "
            f"{tuple(ref.shape)} {ref.dtype} ({ref!r}). The checkpoint files do not match their metadata; "
            "copy the checkpoint again."
        )
    return tensor
