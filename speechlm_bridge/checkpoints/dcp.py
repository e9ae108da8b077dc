"""Read the model weights of a torch.distributed.checkpoint (DCP) directory in one process.

FSDP2 training (Lightning's `ModelParallelStrategy`, as NeMo's SALM recipe uses it) writes
`.metadata` plus one `__{rank}_0.distcp` file per rank, with parameters sharded on dim 0 and keys
`state_dict.<name>` next to `optimizer_0.state.<name>.{exp_avg,exp_avg_sq,step}` and
`optimizer_0.param_groups.*`. Lightning's `FSDPStrategy` writes the model under `model.<name>`.
Only the model entries are requested from the storage reader, so optimizer bytes stay on disk.

`FileSystemReader.read_metadata` unpickles `.metadata` with the standard pickle module (torch
2.13), so only read DCP directories you trust. Byte entries (pickled non-tensor values) are never
requested, because DCP loads them with `torch.load(weights_only=False)`.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from tqdm.auto import tqdm

from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

METADATA_FILE = ".metadata"

# Top-level keys under which Lightning strategies store the model, in order of preference:
# ModelParallelStrategy (FSDP2) uses "state_dict", FSDPStrategy with sharded checkpoints "model".
_MODEL_CONTAINERS = ("state_dict", "model")

# Tensors are requested from the reader in batches of about this many bytes, so the progress bar
# moves on multi-gigabyte checkpoints without one `dcp.load` call per tensor.
_BATCH_BYTES = 512 * 1024 * 1024


def is_dcp_dir(directory: Path) -> bool:
    """Return whether `directory` looks like a DCP checkpoint (it has a `.metadata` file)."""
    return (directory / METADATA_FILE).is_file()


def read_dcp_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Load the full (unsharded) model tensors of a DCP directory, written by any number of ranks.

    Returns the model entries with the container prefix (`state_dict.` or `model.`) stripped.
    Works without a process group and without building the model.
    """
    # 1. metadata and the entries that belong to the model
    metadata = _read_metadata(directory)
    container, tensors_meta = _select_model_entries(metadata, directory)

    # 2. check that every storage file the model entries live in is present and long enough
    items = [
        (index.fqn, info)
        for index, info in (metadata.storage_data or {}).items()
        if index.fqn in tensors_meta
    ]
    _check_storage_files(directory, (info for _, info in items))

    # 3. load in batches, allocating each full tensor once
    bytes_by_fqn: dict[str, int] = {}
    for fqn, info in items:
        bytes_by_fqn[fqn] = bytes_by_fqn.get(fqn, 0) + info.length
    loaded: dict[str, torch.Tensor] = {}
    total = sum(bytes_by_fqn.values())
    with tqdm(total=total, desc="Reading DCP", unit="B", unit_scale=True, disable=None) as bar:
        for batch in _batches(tensors_meta, bytes_by_fqn):
            targets = {
                fqn: torch.empty(tensors_meta[fqn].size, dtype=tensors_meta[fqn].properties.dtype)
                for fqn in batch
            }
            _load(targets, directory)
            loaded.update(targets)
            bar.update(sum(bytes_by_fqn.get(fqn, 0) for fqn in batch))

    distcp_bytes = sum(path.stat().st_size for path in directory.glob("*.distcp"))
    logger.info(
        "Read %d model tensors (%d bytes of storage) from DCP %s and skipped %d other entries. "
        "The .distcp files contain %d bytes in total.",
        len(loaded),
        total,
        directory,
        len(metadata.state_dict_metadata) - len(tensors_meta),
        distcp_bytes,
    )
    prefix = f"{container}."
    return {fqn.removeprefix(prefix): tensor for fqn, tensor in loaded.items()}


def _read_metadata(directory: Path) -> Metadata:
    try:
        return FileSystemReader(directory).read_metadata()
    # A damaged pickle surfaces as whichever error its first bad opcode triggers.
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        AttributeError,
        ImportError,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
    ) as err:
        raise CheckpointError(
            f"Cannot read the DCP metadata {directory / METADATA_FILE} ({type(err).__name__}: "
            f"{err}). The directory must be a torch.distributed.checkpoint save with an intact "
            "`.metadata` file written by a compatible torch version."
        ) from err


def _select_model_entries(
    metadata: Metadata, directory: Path
) -> tuple[str, dict[str, TensorStorageMetadata]]:
    by_container: dict[str, list[str]] = {}
    for fqn in metadata.state_dict_metadata:
        by_container.setdefault(_container_of(fqn, metadata), []).append(fqn)

    container = next((name for name in _MODEL_CONTAINERS if name in by_container), None)
    if container is None:
        raise CheckpointError(
            f"The DCP checkpoint {directory} has no model entries: expected keys under "
            "`state_dict.` (Lightning ModelParallelStrategy / FSDP2) or `model.` (Lightning "
            f"FSDPStrategy), found top-level keys {sorted(by_container)}."
        )

    tensors_meta: dict[str, TensorStorageMetadata] = {}
    skipped_bytes: list[str] = []
    for fqn in by_container[container]:
        entry = metadata.state_dict_metadata[fqn]
        if isinstance(entry, BytesStorageMetadata):
            skipped_bytes.append(fqn)
        else:
            tensors_meta[fqn] = entry

    if not tensors_meta:
        raise CheckpointError(
            f"The DCP checkpoint {directory} has no tensors under `{container}.`, only "
            f"{len(skipped_bytes)} pickled values, but the model's parameters belong there."
        )
    extra_state = [fqn for fqn in skipped_bytes if fqn.endswith("_extra_state")]
    if extra_state:
        logger.debug("Skipped %d `_extra_state` byte entries in %s", len(extra_state), directory)
    others = sorted(set(skipped_bytes) - set(extra_state))
    if others:
        logger.warning(
            "Skipped %d non-tensor model entries in %s that DCP could only load by unpickling "
            "without weights_only: %s",
            len(others),
            directory,
            ", ".join(others[:10]),
        )
    logger.debug(
        "DCP %s: %d model tensors under `%s.`, %d entries in other containers %s",
        directory,
        len(tensors_meta),
        container,
        sum(len(names) for name, names in by_container.items() if name != container),
        sorted(name for name in by_container if name != container),
    )
    return container, tensors_meta


def _container_of(fqn: str, metadata: Metadata) -> str:
    # planner_data maps each flattened key to its path in the nested dict that was saved, which
    # stays correct when a nested key itself contains dots.
    path = (metadata.planner_data or {}).get(fqn)
    if isinstance(path, tuple) and path:
        return str(path[0])
    return fqn.split(".", 1)[0]


def _check_storage_files(directory: Path, infos: Iterable) -> None:
    needed_end: dict[str, int] = {}
    for info in infos:
        end = info.offset + info.length
        needed_end[info.relative_path] = max(needed_end.get(info.relative_path, 0), end)

    missing = sorted(name for name in needed_end if not (directory / name).is_file())
    if missing:
        raise CheckpointError(
            f"The DCP checkpoint {directory} is incomplete: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing, and its `.metadata` places model "
            "weights there. Copy every `__<rank>_0.distcp` file written by the training job."
        )
    short = [
        f"{name} ({(directory / name).stat().st_size} bytes, expected at least {end})"
        for name, end in sorted(needed_end.items())
        if (directory / name).stat().st_size < end
    ]
    if short:
        raise CheckpointError(
            f"The DCP checkpoint {directory} is truncated: {', '.join(short)}. "
            "Copy the files again from the training output."
        )


def _batches(
    tensors_meta: dict[str, TensorStorageMetadata], bytes_by_fqn: dict[str, int]
) -> Iterator[list[str]]:
    batch: list[str] = []
    batch_bytes = 0
    for fqn in tensors_meta:
        batch.append(fqn)
        batch_bytes += bytes_by_fqn.get(fqn, 0)
        if batch_bytes >= _BATCH_BYTES:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch


def _load(targets: dict[str, torch.Tensor], directory: Path) -> None:
    try:
        with warnings.catch_warnings():
            # Single-process loading is the intent here, so torch's notice about it is noise.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=FileSystemReader(directory), no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"Cannot load model tensors from the DCP checkpoint {directory} "
            f"({type(err).__name__}: {err}). The .distcp files are corrupt or do not match "
            "`.metadata`. Copy the checkpoint again."
        ) from err
