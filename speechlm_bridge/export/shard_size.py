"""Parse the maximum safetensors shard size given on the command line or to `export_checkpoint`."""

from __future__ import annotations

import re

from speechlm_bridge.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
# Smaller shards only multiply files (one tensor per shard) and are never what a user means.
MIN_SHARD_BYTES = 10**6


def parse_shard_size(value: str | int) -> int:
    """Return a size such as `5GB`, `500MB`, `2GiB` or a plain byte count in bytes.

    Decimal units are powers of 1000 and binary ones powers of 1024, as in huggingface_hub.
    """
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(f"invalid size {value!r}; write a number with a unit, e.g. 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < MIN_SHARD_BYTES:
        raise ConfigError(f"max shard size {value!r} is {size} bytes; the smallest is 1MB")
    return size
