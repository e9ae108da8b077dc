"""Read a NeMo `.nemo` archive: its `model_config.yaml` and `model_weights.ckpt`.

SALM copies the ASR model's `preprocessor` and `encoder` config into `perception` when it is built
from `pretrained_asr`, so an experiment YAML lacks them. The `.nemo` named there supplies them.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from speechlm_bridge.checkpoints.torch_load import load_torch_file
from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"


@dataclass
class NemoArchive:
    """Config and weights of a `.nemo` archive.

    `config` is `model_config.yaml` parsed as plain YAML (OmegaConf interpolations such as
    `${...}` stay strings). `state_dict` maps NeMo parameter names to CPU tensors.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: Path


def read_nemo_archive(path: str | Path) -> NemoArchive:
    """Read the config and weights of a `.nemo` archive (tar or tar.gz) without NeMo installed.

    Only the two members needed are extracted, with tarfile's `data` filter into a temporary
    directory, so member names cannot escape it. The weights are loaded with
    `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: the file is missing, not a tar archive, or lacks a member.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"NeMo archive {path} not found. Pass the path of a `.nemo` file.")

    try:
        with tarfile.open(path, mode="r:*") as archive, tempfile.TemporaryDirectory() as tmp:
            members = _find_members(archive, path)
            for member in members.values():
                archive.extract(member, tmp, filter="data")
            extracted = {name: Path(tmp) / member.name for name, member in members.items()}

            config = _parse_config(extracted[CONFIG_MEMBER], path)
            # The tensors are memory-mapped from the temporary file. POSIX keeps an unlinked file's
            # pages alive while they are mapped, so removing the directory afterwards is safe.
            try:
                loaded = load_torch_file(extracted[WEIGHTS_MEMBER])
            except CheckpointError as err:
                raise CheckpointError(f"{WEIGHTS_MEMBER} in {path}: {err}") from err
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CheckpointError(
            f"Cannot read {path} as a `.nemo` tar archive ({type(err).__name__}: {err}). "
            "The file is truncated or not a NeMo archive."
        ) from err

    state_dict = _tensor_dict(loaded, path)
    logger.info("Read %d tensors and %s from NeMo archive %s", len(state_dict), CONFIG_MEMBER, path)
    return NemoArchive(config=config, state_dict=state_dict, path=path)


def _find_members(archive: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    found: dict[str, tarfile.TarInfo] = {}
    for member in archive.getmembers():
        # NeMo writes members as "./model_config.yaml", and older archives use bare names.
        name = PurePosixPath(member.name)
        if len(name.parts) == 1 or (len(name.parts) == 2 and name.parts[0] == "."):
            if name.name in (CONFIG_MEMBER, WEIGHTS_MEMBER) and member.isfile():
                found[name.name] = member

    missing = [name for name in (CONFIG_MEMBER, WEIGHTS_MEMBER) if name not in found]
    if missing:
        names = sorted(member.name for member in archive.getmembers())[:20]
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)} at its top level (members: {', '.join(names)}). "
            "Expected a `.nemo` archive written by NeMo's `ModelPT.save_to`. Megatron "
            "distributed `.nemo` archives (a `model_weights/` directory) are not supported."
        )
    return found


def _parse_config(config_path: Path, archive_path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"Cannot parse {CONFIG_MEMBER} in {archive_path}: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{CONFIG_MEMBER} in {archive_path} is a {type(config).__name__}, expected a mapping."
        )
    return config


def _tensor_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"{WEIGHTS_MEMBER} in {path} is not a dict of tensors, expected the state dict "
            "that NeMo's `ModelPT.save_to` writes."
        )
    return dict(loaded)
