"""Plan safetensors shards from shapes and dtypes, then write each file tensor by tensor.

The plan reproduces what `huggingface_hub.save_torch_state_dict(..., metadata={"format": "pt"})`
writes for the same state dict: the same split into `model.safetensors` or
`model-XXXXX-of-YYYYY.safetensors`, the same index file, and files byte-identical to
`safetensors.torch.save_file`. It needs no tensor values, so a file's header can be written first
and its tensors streamed after it:
- a tensor whose raw bytes lie in checkpoint files (`TensorRef.byte_ranges`: FSDP2 chunks split
  on dim 0, safetensors entries) and need no cast is copied with `os.copy_file_range`, without
  passing through the process's memory;
- the others are loaded in batches of about `BATCH_BYTES`. A thread loads the next batch while
  the current one is written when both fit in `2 * BATCH_BYTES`.
Peak memory is therefore about the largest loaded tensor or two batches, whichever is larger,
independent of shard and model size.

File layout (safetensors 0.8): an 8-byte little-endian header length, a JSON header padded with
spaces to a multiple of 8 bytes, then the tensor bytes. Tensors are ordered by dtype (the
`SAFETENSORS_DTYPES` order, highest first), then by name, and the header lists them in that order
after `__metadata__`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from speechlm_bridge.checkpoints.lazy import TensorRef, as_ref, prefetch
from speechlm_bridge.checkpoints.safetensors_files import INDEX_FILE, SAFETENSORS_DTYPES
from speechlm_bridge.errors import CheckpointError

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


def write_shard(shard: ShardPlan, directory: Path, *, progress: bool | None = False) -> int:
    """Write one planned shard into `directory`, loading its tensors batch by batch.

    Returns the bytes written. Raises `CheckpointError` when a loaded tensor's shape or dtype
    differs from what the checkpoint's metadata announced.
    """
    entries = _file_order(shard.tensors)
    header = _header(entries)
    path = directory / shard.filename
    with open(path, "wb", buffering=0) as handle, tqdm(
        total=len(header) + shard.nbytes,
        desc=shard.filename,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        # tqdm's None disables the bar unless stderr is a terminal.
        disable=None if progress is None else not progress,
        leave=False,
    ) as bar:
        _write_all(handle, header)
        bar.update(len(header))
        for ranges, segment in _segments(entries):
            if ranges is not None:
                for file_ranges in ranges:
                    _copy_ranges(file_ranges, handle, bar)
            else:
                _write_loaded(segment, handle, bar)
    written = len(header) + shard.nbytes
    logger.debug("wrote %s (%d tensors, %d bytes)", path, len(entries), written)
    return written


def _segments(
    entries: list[tuple[str, TensorRef]],
) -> Iterator[tuple[list[list[tuple[Path, int, int]]] | None, list[tuple[str, TensorRef]]]]:
    """Group consecutive tensors into runs that are copied file to file or loaded and written.

    Yields `(ranges per tensor, run)` for a copied run and `(None, run)` for a loaded one.
    """
    run: list[tuple[str, TensorRef]] = []
    run_ranges: list[list[tuple[Path, int, int]]] = []
    copying = None
    for name, ref in entries:
        ranges = ref.byte_ranges()
        if ranges is not None and sum(length for _, _, length in ranges) != ref.nbytes:
            ranges = None
        if run and (ranges is not None) != copying:
            yield (run_ranges if copying else None), run
            run, run_ranges = [], []
        copying = ranges is not None
        run.append((name, ref))
        if ranges is not None:
            run_ranges.append(ranges)
    if run:
        yield (run_ranges if copying else None), run


def _copy_ranges(ranges: list[tuple[Path, int, int]], handle, bar: tqdm) -> None:
    """Append file ranges to `handle` with `os.copy_file_range`, so the bytes stay in the kernel."""
    for source, offset, length in ranges:
        with open(source, "rb", buffering=0) as source_handle:
            remaining = length
            position = offset
            while remaining:
                try:
                    count = os.copy_file_range(source_handle.fileno(), handle.fileno(), remaining, position)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # Filesystems or kernels without copy_file_range between these files.
                    count = _copy_through_buffer(source_handle, handle, position, remaining)
                if count == 0:
                    raise CheckpointError(
                        f"{source} ended {remaining} bytes early while copying a tensor at offset {offset}; "
                        "the file is truncated, so copy the checkpoint again."
                    )
                remaining -= count
                position += count
                bar.update(count)


def _copy_through_buffer(source, target, position: int, length: int) -> int:
    data = os.pread(source.fileno(), min(length, 16 * 1024 * 1024), position)
    _write_all(target, data)
    return len(data)


def _write_loaded(batch_entries: list[tuple[str, TensorRef]], handle, bar: tqdm) -> None:
    batches = list(_batches(batch_entries))
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
                _write_all(handle, memoryview(tensors[position].reshape(-1).view(torch.uint8).numpy()))
                tensors[position] = None
                bar.update(ref.nbytes)
            del tensors
            if following is not None and pending is None:
                pending = loader.submit(_load_batch, following)


def _write_all(handle, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        count = handle.write(view)
        view = view[count:]


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
