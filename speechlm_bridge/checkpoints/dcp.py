"""Read the model weights of a torch.distributed.checkpoint (DCP) directory in one process.

FSDP2 training (Lightning's `ModelParallelStrategy`, as NeMo's SALM recipe uses it) writes
`.metadata` plus one `__{rank}_0.distcp` file per rank, with parameters sharded on dim 0 and keys
`state_dict.<name>` next to `optimizer_0.state.<name>.{exp_avg,exp_avg_sq,step}` and
`optimizer_0.param_groups.*`. Lightning's `FSDPStrategy` writes the model under `model.<name>`.
Only the model entries are requested from the storage reader, so optimizer bytes stay on disk.

`FileSystemReader.read_metadata` unpickles `.metadata` with the standard pickle module (torch
2.13), so only read DCP directories you trust. Byte entries (pickled non-tensor values) are never
requested, because DCP loads them with `torch.load(weights_only=False)`.

`dcp_tensor_refs` returns lazy references built from `.metadata` alone; `read_dcp_dir` loads them all.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from tqdm.auto import tqdm

from speechlm_bridge.checkpoints.lazy import SourceRef
from speechlm_bridge.checkpoints.torch_save_record import entry_data_offset, read_entries, read_entry
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


def dcp_tensor_refs(directory: Path) -> dict[str, DcpTensor]:
    """Return lazy references to the full model tensors of a DCP directory, from `.metadata` only.

    Keys have the container prefix (`state_dict.` or `model.`) stripped. The storage files the
    model entries live in are checked for presence and length now, so a missing or truncated
    `.distcp` file fails before anything is written.
    """
    metadata, container, tensors_meta, bytes_by_fqn = _model_storage(directory)
    # A checkpoint rewritten at the same path replaces what earlier reads cached.
    _METADATA_CACHE[str(directory)] = metadata
    _STORAGE_CACHE.pop(str(directory), None)
    prefix = f"{container}."
    return {
        fqn.removeprefix(prefix): DcpTensor(
            directory, fqn, tuple(entry.size), entry.properties.dtype, bytes_by_fqn.get(fqn, 0)
        )
        for fqn, entry in tensors_meta.items()
    }


def read_dcp_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Load the full (unsharded) model tensors of a DCP directory, written by any number of ranks.

    Returns the model entries with the container prefix (`state_dict.` or `model.`) stripped.
    Works without a process group and without building the model.
    """
    # 1. metadata, the entries that belong to the model, and their storage files
    metadata, container, tensors_meta, bytes_by_fqn = _model_storage(directory)

    # 2. load in batches, allocating each full tensor once
    loaded: dict[str, torch.Tensor] = {}
    total = sum(bytes_by_fqn.values())
    with tqdm(total=total, desc="Reading DCP", unit="B", unit_scale=True, disable=None) as bar:
        for batch in _batches(tensors_meta, bytes_by_fqn):
            targets = {
                fqn: torch.empty(tensors_meta[fqn].size, dtype=tensors_meta[fqn].properties.dtype)
                for fqn in batch
            }
            _load(targets, directory, metadata)
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


class DcpTensor(SourceRef):
    """One full model tensor of a DCP directory, assembled from its per-rank chunks when loaded."""

    def __init__(self, directory: Path, fqn: str, shape: tuple[int, ...], dtype: torch.dtype, stored_bytes: int) -> None:
        self.directory = Path(directory)
        self.fqn = fqn
        self.shape = shape
        self.dtype = dtype
        self.stored_bytes = stored_bytes

    def _load(self) -> torch.Tensor:
        return self.load_many([self])[0]

    def byte_ranges(self) -> list[tuple[Path, int, int]] | None:
        """Return the file ranges of the tensor's bytes when its chunks split it along dim 0 only.

        That is how FSDP2 shards parameters. Each chunk is a `torch.save` record inside a
        `.distcp` file. Its raw storage is used when it is stored uncompressed, contains exactly the
        chunk's elements, and its pickled view is contiguous from element 0 (checked on the meta
        device, which reads no tensor bytes). Anything else returns None, and the tensor is loaded
        through `dcp.load` instead.
        """
        if not self.shape:
            return None
        try:
            return _chunk_byte_ranges(self)
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            # The loading path reports a damaged file with the error that names it.
            logger.debug("%s in %s is loaded through dcp.load: %s", self.fqn, self.directory, err)
            return None

    @classmethod
    def load_many(cls, refs: list[DcpTensor]) -> list[torch.Tensor]:
        """Load the tensors with one `dcp.load` call per directory, reusing its parsed `.metadata`."""
        targets: dict[int, torch.Tensor] = {}
        by_directory: dict[Path, list[DcpTensor]] = {}
        for ref in refs:
            by_directory.setdefault(ref.directory, []).append(ref)
        for directory, group in by_directory.items():
            batch = {ref.fqn: torch.empty(ref.shape, dtype=ref.dtype) for ref in group}
            _load(batch, directory, _cached_metadata(directory))
            for ref in group:
                targets[id(ref)] = batch[ref.fqn]
        return [targets[id(ref)] for ref in refs]


def _chunk_byte_ranges(ref: DcpTensor) -> list[tuple[Path, int, int]] | None:
    metadata = _cached_metadata(ref.directory)
    storage = _storage_by_chunk(ref.directory, metadata)
    chunks = sorted(metadata.state_dict_metadata[ref.fqn].chunks, key=lambda chunk: tuple(chunk.offsets))
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    row_bytes = itemsize
    for size in ref.shape[1:]:
        row_bytes *= size

    ranges = []
    rows = 0
    for chunk in chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if offsets[0] != rows or any(offsets[1:]) or sizes[1:] != tuple(ref.shape[1:]):
            return None
        rows += sizes[0]
        if sizes[0] == 0:
            continue
        info = storage[(ref.fqn, offsets)]
        if getattr(info, "transform_descriptors", None):
            return None
        path = ref.directory / info.relative_path
        start = _storage_record_start(path, info.offset, info.length, dtype=ref.dtype, sizes=sizes, nbytes=sizes[0] * row_bytes)
        if start is None:
            return None
        ranges.append((path, info.offset + start, sizes[0] * row_bytes))
    return ranges if rows == ref.shape[0] else None


def _storage_record_start(
    path: Path, offset: int, length: int, *, dtype: torch.dtype, sizes: tuple[int, ...], nbytes: int
) -> int | None:
    """Return where the raw storage of a `torch.save` record starts, relative to the record."""
    with open(path, "rb", buffering=0) as handle:
        fd = handle.fileno()
        entries = read_entries(fd, offset, length)
        storages = [entry for name, entry in entries.items() if "/data/" in name and "/.data/" not in name]
        pickles = [entry for name, entry in entries.items() if name.endswith("/data.pkl")]
        if len(storages) != 1 or len(pickles) != 1 or storages[0].size != nbytes:
            return None
        start = entry_data_offset(fd, offset, storages[0])
        pickled_view = read_entry(fd, offset, pickles[0])
        # The pickle alone fixes the view's dtype, shape, strides and offset, and the chunks of
        # one tensor family share it, so each distinct pickle is unpickled once.
        key = (pickled_view, dtype, sizes)
        if key not in _VIEW_IS_WHOLE_STORAGE:
            record = io.BufferedReader(_FileSlice(handle, offset, length), 64 * 1024)
            chunk = torch.load(record, map_location="meta", weights_only=True)
            if len(_VIEW_IS_WHOLE_STORAGE) >= _VIEW_CACHE_ENTRIES:
                _VIEW_IS_WHOLE_STORAGE.clear()
            _VIEW_IS_WHOLE_STORAGE[key] = (
                isinstance(chunk, torch.Tensor)
                and chunk.dtype == dtype
                and tuple(chunk.shape) == sizes
                and chunk.is_contiguous()
                and chunk.storage_offset() == 0
            )
    return start if _VIEW_IS_WHOLE_STORAGE[key] else None


# Whether a chunk's pickled view covers its whole storage, by (pickle bytes, dtype, shape).
_VIEW_IS_WHOLE_STORAGE: dict[tuple[bytes, torch.dtype, tuple[int, ...]], bool] = {}
_VIEW_CACHE_ENTRIES = 4096


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window `[start, start + length)` of an open file."""

    def __init__(self, handle: io.BufferedReader, start: int, length: int) -> None:
        self.handle = handle
        self.start = start
        self.length = length
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, min(self.length, base + offset))
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self.position)
        if count <= 0:
            return 0
        data = os.pread(self.handle.fileno(), count, self.start + self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _storage_by_chunk(directory: Path, metadata: Metadata) -> dict[tuple[str, tuple[int, ...]], object]:
    key = str(directory)
    if key not in _STORAGE_CACHE:
        _STORAGE_CACHE[key] = {
            (index.fqn, tuple(index.offset or ())): info for index, info in (metadata.storage_data or {}).items()
        }
    return _STORAGE_CACHE[key]


_STORAGE_CACHE: dict[str, dict] = {}

# Parsed `.metadata` per directory, so that batches and worker processes unpickle it once.
_METADATA_CACHE: dict[str, Metadata] = {}


def _cached_metadata(directory: Path) -> Metadata:
    key = str(directory)
    if key not in _METADATA_CACHE:
        _METADATA_CACHE[key] = _read_metadata(directory)
    return _METADATA_CACHE[key]


class _CachedMetadataReader(FileSystemReader):
    """A FileSystemReader that returns metadata parsed earlier instead of unpickling `.metadata` again."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(directory)
        self._metadata = metadata

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        return self._metadata


def _model_storage(
    directory: Path,
) -> tuple[Metadata, str, dict[str, TensorStorageMetadata], dict[str, int]]:
    """Read `.metadata`, select the model's tensor entries, check their storage files.

    Returns the metadata, the container name, the tensor entries and their stored bytes.
    """
    metadata = _read_metadata(directory)
    container, tensors_meta = _select_model_entries(metadata, directory)
    items = [
        (index.fqn, info)
        for index, info in (metadata.storage_data or {}).items()
        if index.fqn in tensors_meta
    ]
    _check_storage_files(directory, (info for _, info in items))
    bytes_by_fqn: dict[str, int] = {}
    for fqn, info in items:
        bytes_by_fqn[fqn] = bytes_by_fqn.get(fqn, 0) + info.length
    return metadata, container, tensors_meta, bytes_by_fqn


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


def _load(targets: dict[str, torch.Tensor], directory: Path, metadata: Metadata) -> None:
    try:
        with warnings.catch_warnings():
            # Single-process loading is the intent here, so torch's notice about it is noise.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=_CachedMetadataReader(directory, metadata), no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"Cannot load model tensors from the DCP checkpoint {directory} "
            f"({type(err).__name__}: {err}). The .distcp files are corrupt or do not match "
            "`.metadata`. Copy the checkpoint again."
        ) from err
