"""Read and validate a safetensors header without reading any tensor data.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor
data. The JSON maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`, with
offsets relative to the start of the data, plus an optional `__metadata__` dict of strings.
Checking the header against the file size finds a truncated file of any size by reading only
its first N + 8 bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from speechlm_bridge.errors import CheckpointError

# safetensors rejects headers larger than 100 MB (MAX_HEADER_SIZE in safetensors 0.8).
MAX_HEADER_BYTES = 100_000_000

# Bits per element of each safetensors dtype, and the torch dtype name it loads as.
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
    "F64": (64, "float64"),
    "C64": (64, "complex64"),
    "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, "float6_e2m3"),
    "F6_E3M2": (6, "float6_e3m2"),
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, torch dtype name and shape of one stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Return the tensors of a safetensors file by name, reading only its header.

    Raises CheckpointError naming the file when the header is invalid or the file is shorter or
    longer than the header declares.
    """
    try:
        with path.open("rb") as handle:
            file_size = path.stat().st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is {file_size} bytes, too short for a safetensors header")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > file_size:
                raise CheckpointError(
                    f"{path} declares a {header_bytes}-byte header but the file has {file_size} bytes; "
                    "the file is truncated or not a safetensors file"
                )
            raw_header = handle.read(header_bytes)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from err

    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"the header of {path} is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"the header of {path} is not a JSON object")

    tensors: dict[str, TensorInfo] = {}
    extents: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, begin, end = _parse_entry(path, name, entry)
        tensors[name] = info
        extents.append((begin, end, name))
    _check_extents(path, extents, data_bytes=file_size - 8 - header_bytes)
    return tensors


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: the header entry of {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has the unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has the invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(value) for value in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has the invalid data_offsets {offsets!r}")
    begin, end = offsets
    bits, torch_name = SAFETENSORS_DTYPES[dtype]
    expected_bytes = math.ceil(math.prod(shape) * bits / 8)
    if end - begin != expected_bytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {expected_bytes} bytes but its "
            f"data_offsets {offsets} span {end - begin}"
        )
    return TensorInfo(name=name, dtype=torch_name, shape=tuple(shape)), begin, end


def _check_extents(path: Path, extents: list[tuple[int, int, str]], *, data_bytes: int) -> None:
    # safetensors requires the tensors to tile the data section: no gaps, no overlaps.
    position = 0
    for begin, end, name in sorted(extents):
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at data offset {begin}, expected {position}; the "
                "header's data_offsets leave a gap or overlap"
            )
        position = end
    if position != data_bytes:
        state = "truncated" if data_bytes < position else "longer than its header says"
        raise CheckpointError(
            f"{path} is {state}: the header describes {position} bytes of tensor data, the file "
            f"has {data_bytes}"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
