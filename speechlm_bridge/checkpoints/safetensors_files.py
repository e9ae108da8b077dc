"""Read `.safetensors` weights: one file, or a directory with one file or a sharded index."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of one `.safetensors` file into CPU memory."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"Cannot read {path} as safetensors ({err}). The file is truncated or corrupt, so "
            "copy it again and compare its size with the original."
        ) from err


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Read the weights of a directory with `model.safetensors` or `model.safetensors.index.json`.

    With an index, only the shard files named in its `weight_map` are opened, and each must hold
    exactly the keys the index assigns to it.
    """
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        return read_sharded_safetensors(index_path)
    single = directory / SINGLE_FILE
    if single.is_file():
        return read_safetensors_file(single)
    raise CheckpointError(
        f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}. "
        "Pass the directory that contains the model weights."
    )


def read_sharded_safetensors(index_path: Path) -> dict[str, torch.Tensor]:
    """Read the shards listed in a `model.safetensors.index.json`, with a progress bar per shard."""
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
    for shard, keys in tqdm(keys_by_shard.items(), desc="Reading shards", unit="shard", disable=None):
        tensors = read_safetensors_file(index_path.parent / shard)
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
