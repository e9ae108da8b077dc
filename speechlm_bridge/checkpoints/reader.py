"""Detect a training checkpoint's format from its path and read its model weights.

| path | format | config |
|---|---|---|
| Lightning `.ckpt` (has `pytorch-lightning_version`) | `lightning` | `hyper_parameters.cfg` |
| `.pt` / `.pth` / `.bin` / other `.ckpt` state dict | `torch` | None |
| `.safetensors` file, or a dir with `model.safetensors[.index.json]` | `safetensors` | None |
| dir with `.metadata` + `__{rank}_0.distcp` (FSDP2 / DCP) | `dcp` | `meta.pt` `hyper_parameters.cfg` |
| dir with `config.json` (`model_type: nemo_speechlm`) | `nemo-save-pretrained` | config.json |
| same + `llm_backbone/config.json` (NeMo's `to_hf.py`) | `nemo-to-hf` | config.json |

Nothing here imports NeMo or builds a model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speechlm_bridge.checkpoints.dcp import METADATA_FILE, dcp_tensor_refs, is_dcp_dir, read_dcp_dir
from speechlm_bridge.checkpoints.lazy import SourceRef, TensorRef
from speechlm_bridge.checkpoints.safetensors_files import (
    INDEX_FILE,
    SINGLE_FILE,
    read_safetensors_dir,
    read_safetensors_file,
    read_sharded_safetensors,
    safetensors_file_refs,
)
from speechlm_bridge.checkpoints.torch_load import load_torch_file
from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMATS = ("lightning", "torch", "safetensors", "dcp", "nemo-save-pretrained", "nemo-to-hf")

NEMO_MODEL_TYPE = "nemo_speechlm"

_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_EXPECTED = (
    "a Lightning `.ckpt`, a state-dict `.pt`/`.pth`/`.bin`, a `.safetensors` file, a directory "
    f"with {SINGLE_FILE} or {INDEX_FILE}, a torch.distributed.checkpoint directory (`.metadata` "
    "+ `__<rank>_0.distcp`), or a NeMo `save_pretrained`/`to_hf` directory"
)


@dataclass
class LoadedCheckpoint:
    """Model weights of a training checkpoint, in the names the training code used.

    `format` is one of `FORMATS`. `config` is the NeMo model config when the checkpoint carries
    one: Lightning's `hyper_parameters["cfg"]` (the dict passed to SALM, without the perception
    preprocessor/encoder blocks) or the `config.json` of a NeMo directory (with them).
    `state_dict` values are lazy `TensorRef`s when the checkpoint was read with `lazy=True`.
    """

    state_dict: dict[str, torch.Tensor | TensorRef]
    format: str
    config: dict[str, Any] | None
    path: Path
    # The key of a torch file's top-level dict that contains the state dict (None: the file is one).
    container: str | None = None

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensors. Tied names that share one storage each count in full."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.state_dict.values())


def read_checkpoint(path: str | Path, *, lazy: bool = False) -> LoadedCheckpoint:
    """Read the model weights (and the NeMo model config, if present) of a training checkpoint.

    With `lazy`, only metadata is read (safetensors headers, the DCP `.metadata`, the pickle of
    a memory-mapped torch file) and the state dict maps names to `TensorRef`s, whose values are
    loaded when used. Missing and truncated shard files are reported in both modes.

    Optimizer states are never loaded: Lightning files are memory-mapped and their optimizer
    tensors never touched, and DCP optimizer entries are not requested from the storage reader.

    Raises:
        CheckpointError: the path is missing, matches no known format, or is unreadable,
            corrupt or truncated.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} not found. Expected {_EXPECTED}.")

    if path.is_dir():
        loaded = _read_directory(path, lazy)
    else:
        loaded = _read_file(path, lazy)

    logger.info(
        "%s %d tensors (%.1f MB) from %s checkpoint %s",
        "Found" if lazy else "Read",
        len(loaded.state_dict),
        loaded.nbytes / 1e6,
        loaded.format,
        path,
    )
    return loaded


def _read_file(path: Path, lazy: bool) -> LoadedCheckpoint:
    if path.name == METADATA_FILE:
        return _read_directory(path.parent, lazy)
    if path.suffix == ".safetensors":
        tensors = safetensors_file_refs(path) if lazy else read_safetensors_file(path)
        return LoadedCheckpoint(tensors, "safetensors", None, path)
    if path.name == INDEX_FILE:
        return LoadedCheckpoint(read_sharded_safetensors(path, lazy=lazy), "safetensors", None, path)
    if path.suffix in _TORCH_SUFFIXES:
        loaded = _read_torch_file(path)
        if lazy:
            loaded.state_dict = {
                name: TorchFileTensor(path, loaded.container, name, tensor)
                for name, tensor in loaded.state_dict.items()
            }
        return loaded
    if path.suffix == ".nemo":
        raise CheckpointError(
            f"{path} is a NeMo `.nemo` archive, which SALM training does not write. Pass the "
            "training checkpoint instead (`read_nemo_archive` reads a `.nemo` ASR model's config)."
        )
    raise CheckpointError(f"{path} has an unknown checkpoint suffix {path.suffix!r}. Expected {_EXPECTED}.")


def _read_torch_file(path: Path) -> LoadedCheckpoint:
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} contains a {type(obj).__name__}, expected a dict of tensors, "
            "`{'state_dict': ...}` or a Lightning checkpoint."
        )

    if "pytorch-lightning_version" in obj:
        state_dict = _tensor_entries(obj.get("state_dict"), path, "state_dict")
        config = _lightning_config(obj, path)
        return LoadedCheckpoint(state_dict, "lightning", config, path, container="state_dict")

    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            tensors = _tensor_entries(obj[wrapper], path, wrapper)
            return LoadedCheckpoint(tensors, "torch", None, path, container=wrapper)
    return LoadedCheckpoint(_tensor_entries(obj, path, None), "torch", None, path)


class TorchFileTensor(SourceRef):
    """One tensor of a memory-mapped torch file.

    In the process that read the file it keeps the mapped tensor. Pickled into a worker process it
    keeps only its location and maps the file again there, once per process.

    NOTE: the pages of a memory-mapped file that the export has read count in the process's RSS
    until the file is unmapped, so peak RSS can reach the file size. The kernel can drop them,
    because they are clean page cache. DCP and safetensors inputs are read tensor by tensor.
    """

    def __init__(self, path: Path, container: str | None, name: str, tensor: torch.Tensor | None) -> None:
        self.path = Path(path)
        self.container = container
        self.name = name
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def _load(self) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor
        key = str(self.path)
        if key not in _MAPPED_TORCH_FILES:
            _MAPPED_TORCH_FILES[key] = load_torch_file(self.path)
        obj = _MAPPED_TORCH_FILES[key]
        return (obj[self.container] if self.container else obj)[self.name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tensor": None}


# Torch files mapped again in a worker process, by path.
_MAPPED_TORCH_FILES: dict[str, Any] = {}


def _read_directory(path: Path, lazy: bool = False) -> LoadedCheckpoint:
    if is_dcp_dir(path):
        tensors = dcp_tensor_refs(path) if lazy else read_dcp_dir(path)
        return LoadedCheckpoint(tensors, "dcp", _dcp_config(path), path)

    config = _nemo_config(path)
    if config is not None:
        kind = "nemo-to-hf" if (path / "llm_backbone" / "config.json").is_file() else "nemo-save-pretrained"
        return LoadedCheckpoint(read_safetensors_dir(path, lazy=lazy), kind, config, path)

    if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
        return LoadedCheckpoint(read_safetensors_dir(path, lazy=lazy), "safetensors", None, path)

    raise CheckpointError(_unknown_directory_message(path))


def _tensor_entries(value: object, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    where = f"`{key}` in {path}" if key else str(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is a {type(value).__name__}, expected a dict of tensors.")

    tensors: dict[str, torch.Tensor] = {}
    extra_state = 0
    others: list[str] = []
    for name, tensor in value.items():
        if isinstance(tensor, torch.Tensor):
            tensors[str(name)] = tensor
        elif str(name).endswith("_extra_state"):
            extra_state += 1
        else:
            others.append(f"{name} ({type(tensor).__name__})")
    if others:
        raise CheckpointError(
            f"{where} has non-tensor entries {', '.join(sorted(others)[:10])}, expected a state "
            "dict that maps parameter names to tensors."
        )
    if extra_state:
        logger.debug("Dropped %d non-tensor `_extra_state` entries of %s", extra_state, where)
    if not tensors:
        raise CheckpointError(f"{where} contains no tensors.")
    return tensors


def _lightning_config(checkpoint: dict, path: Path) -> dict[str, Any] | None:
    hyper_parameters = checkpoint.get("hyper_parameters")
    if not hyper_parameters or "cfg" not in hyper_parameters:
        logger.debug("%s has no hyper_parameters['cfg'], so no model config is returned", path)
        return None
    return _plain_config(hyper_parameters["cfg"], path)


def _dcp_config(directory: Path) -> dict[str, Any] | None:
    meta = directory / "meta.pt"
    if not meta.is_file():
        return None
    # The weights are already read, so an unreadable meta.pt only costs the stored config.
    try:
        rest = load_torch_file(meta)
    except CheckpointError as err:
        logger.warning("Ignoring %s, so no model config is returned: %s", meta, err)
        return None
    return _lightning_config(rest, meta) if isinstance(rest, dict) else None


def _plain_config(cfg: object, path: Path) -> dict[str, Any] | None:
    if isinstance(cfg, dict):
        return cfg
    # A DictConfig only gets here when omegaconf is installed (see torch_load).
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        pass
    else:
        if isinstance(cfg, DictConfig):
            try:
                return OmegaConf.to_container(cfg, resolve=True)
            except OmegaConfBaseException as err:
                raise CheckpointError(
                    f"Cannot resolve the OmegaConf hyper_parameters['cfg'] of {path}: {err}"
                ) from err
    logger.warning(
        "hyper_parameters['cfg'] in %s is a %s, not a dict, so no model config is returned",
        path,
        type(cfg).__name__,
    )
    return None


def _nemo_config(directory: Path) -> dict[str, Any] | None:
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot parse {config_path} as JSON: {err}") from err
    if isinstance(config, dict) and config.get("model_type") == NEMO_MODEL_TYPE:
        return config
    return None


def _unknown_directory_message(path: Path) -> str:
    entries = sorted(child.name for child in path.iterdir())
    if not entries:
        return f"Checkpoint directory {path} is empty. Expected {_EXPECTED}."

    # A Lightning log dir often contains the checkpoints one level down, so name them as a hint.
    candidates = sorted(
        str(child.relative_to(path))
        for child in [*path.glob("*"), *path.glob("*/*")]
        if child.suffix in _TORCH_SUFFIXES + (".safetensors",) or is_dcp_dir(child)
    )
    message = (
        f"{path} is not a checkpoint in a known format (entries: {', '.join(entries[:10])}"
        f"{', ...' if len(entries) > 10 else ''}). Expected {_EXPECTED}."
    )
    if candidates:
        message += f" Checkpoints found inside: {', '.join(candidates[:5])}."
    return message
