"""Read `.safetensors` weights: one file, or a directory with one file or a sharded index.

The `read_*` functions load every tensor; the `*_refs` functions read only the headers and
return lazy references.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from speechlm_bridge.checkpoints.lazy import SourceRef
from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors' dtype names, in the order of its `Dtype` enum (safetensors 0.8). save_file writes
# a file's tensors by this order, highest first, then by name.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of one `.safetensors` file into CPU memory."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise _unreadable(path, err) from err


def safetensors_file_refs(path: Path) -> dict[str, SafetensorsTensor]:
    """Return lazy references to the tensors of one `.safetensors` file, from its header only."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            refs = {}
            for key in handle.keys():
                view = handle.get_slice(key)
                refs[key] = SafetensorsTensor(path, key, tuple(view.get_shape()), _torch_dtype(view.get_dtype(), path, key))
            return refs
    except (SafetensorError, OSError, RuntimeError) as err:
        raise _unreadable(path, err) from err


class SafetensorsTensor(SourceRef):
    """One tensor of a `.safetensors` file, memory-mapped when loaded."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.key = key
        self.shape = shape
        self.dtype = dtype

    def _load(self) -> torch.Tensor:
        return self.load_many([self])[0]

    def byte_ranges(self) -> list[tuple[Path, int, int]] | None:
        """Return the tensor's byte range from the file header (safetensors stores raw row-major bytes)."""
        try:
            data_start, entries = _read_header(self.path)
        except (OSError, ValueError, struct.error) as err:
            # The loading path reports a damaged file with the error that names it.
            logger.debug("%s in %s is loaded through safe_open: %s", self.key, self.path, err)
            return None
        entry = entries.get(self.key)
        if not isinstance(entry, dict) or entry.get("shape") != list(self.shape):
            return None
        begin, end = entry["data_offsets"]
        return [(self.path, data_start + begin, end - begin)]

    @classmethod
    def load_many(cls, refs: list[SafetensorsTensor]) -> list[torch.Tensor]:
        """Open each file once for all of its requested tensors."""
        loaded: dict[int, torch.Tensor] = {}
        by_path: dict[Path, list[SafetensorsTensor]] = {}
        for ref in refs:
            by_path.setdefault(ref.path, []).append(ref)
        for path, group in by_path.items():
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for ref in group:
                        loaded[id(ref)] = handle.get_tensor(ref.key)
            except (SafetensorError, OSError, RuntimeError) as err:
                raise _unreadable(path, err) from err
        return [loaded[id(ref)] for ref in refs]


def read_safetensors_dir(directory: Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Read the weights of a directory with `model.safetensors` or `model.safetensors.index.json`.

    With `lazy`, only headers are read and the values are lazy references.
    With an index, only the shard files named in its `weight_map` are opened, and each must hold
    exactly the keys the index assigns to it.
    """
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        return read_sharded_safetensors(index_path, lazy=lazy)
    single = directory / SINGLE_FILE
    if single.is_file():
        return safetensors_file_refs(single) if lazy else read_safetensors_file(single)
    raise CheckpointError(
        f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}. "
        "Pass the directory that contains the model weights."
    )


def read_sharded_safetensors(index_path: Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Read the shards listed in a `model.safetensors.index.json`, with a progress bar per shard.

    With `lazy`, only the shard headers are read and the values are lazy references.
    """
    weight_map = _read_weight_map(index_path)
    keys_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, []).append(key)

    # 1. every shard the index names must exist before any is read
    missing = sorted(shard for shard in keys_by_shard if not (index_path.parent / shard).is_file())
    if missing:
        raise CheckpointError(
            f"{index_path} names shard files that are not in {index_path.parent}: "
            f"{', '.join(missing)}. Copy the missing shards next to the index."
        )

    # 2. read each shard and check it against the index
    state_dict: dict[str, torch.Tensor] = {}
    shards = keys_by_shard.items()
    for shard, keys in shards if lazy else tqdm(shards, desc="Reading shards", unit="shard", disable=None):
        path = index_path.parent / shard
        tensors = safetensors_file_refs(path) if lazy else read_safetensors_file(path)
        absent = sorted(set(keys) - tensors.keys())
        if absent:
            raise CheckpointError(
                f"{index_path.parent / shard} lacks {len(absent)} tensors that {index_path.name} "
                f"assigns to it, e.g. {', '.join(absent[:5])}. The index and the shards come "
                "from different saves, so copy the directory again."
            )
        for key in keys:
            state_dict[key] = tensors[key]
    return state_dict


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot parse {index_path} as JSON: {err}") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no `weight_map` object mapping tensor names to shard files.")
    bad = sorted(key for key, shard in weight_map.items() if not _is_plain_file_name(shard))
    if bad:
        raise CheckpointError(
            f"{index_path} maps {', '.join(bad[:5])} to a path outside its directory or to a "
            "non-string value, but shard entries must be plain file names."
        )
    return weight_map


def _is_plain_file_name(value: object) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"Cannot read {path} as safetensors ({err}). The file is truncated or corrupt, so "
        "copy it again and compare its size with the original."
    )


def _torch_dtype(name: str, path: Path, key: str) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{key} in {path} has dtype {name}, which speechlm-bridge does not read; supported: "
            f"{', '.join(SAFETENSORS_DTYPES)}."
        )
    return SAFETENSORS_DTYPES[name]


def _read_header(path: Path) -> tuple[int, dict]:
    """Return where the data of a safetensors file starts and its parsed JSON header."""
    stat = path.stat()
    # The size and modification time make a rewritten file at the same path a new entry.
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HEADER_CACHE:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        _HEADER_CACHE[key] = (8 + length, header)
    return _HEADER_CACHE[key]


# Parsed headers by file, because the writer requests the tensors of many files in turn.
_HEADER_CACHE: dict[tuple[str, int, int], tuple[int, dict]] = {}
