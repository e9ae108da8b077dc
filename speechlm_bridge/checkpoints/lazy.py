"""Lazy tensors: a checkpoint entry's shape and dtype now, its values only when the export writes it.

A `TensorRef` is built from checkpoint metadata alone (a safetensors header, a DCP `.metadata`, a
memory-mapped torch file) or derived from other references (dtype cast, LoRA merge, row padding).
State-dict functions in this package accept a mapping whose values are tensors or references:
they read `.shape`, `.dtype`, `.numel()` and `.element_size()`, which both provide, and call
`load_tensor` only where they need values. References are picklable, so a plan built in one
process can be written by worker processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

LoadCache = dict[int, torch.Tensor]


class TensorRef:
    """A tensor that is loaded on request. Subclasses set `shape` and `dtype` and implement `_load`."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self, cache: LoadCache | None = None) -> torch.Tensor:
        """Load the tensor on the CPU; `cache` contains leaves that `prefetch` loaded."""
        raise NotImplementedError

    def leaves(self) -> Iterator[TensorRef]:
        """Yield the source references this tensor is computed from (itself for a source)."""
        yield self

    def byte_ranges(self) -> list[tuple[Path, int, int]] | None:
        """Return `(file, offset, length)` ranges whose concatenation is the tensor's raw bytes.

        The bytes are in row-major order and in `dtype`, as safetensors stores them, so a writer
        can copy them file to file without loading the tensor. None when the tensor must be loaded
        (computed tensors, or a storage layout that is not a plain byte range).
        """
        return None

    # Enough of the torch.Tensor interface for the state-dict functions.
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


class SourceRef(TensorRef):
    """A reference read from a checkpoint file. Subclasses implement `_load` and may batch `load_many`."""

    def load(self, cache: LoadCache | None = None) -> torch.Tensor:
        if cache is not None and id(self) in cache:
            return cache.pop(id(self))
        return self._load()

    def _load(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def load_many(cls, refs: list[Any]) -> list[torch.Tensor]:
        """Load several references of this class at once (one call per reference by default)."""
        return [ref._load() for ref in refs]


class InMemoryTensor(SourceRef):
    """A tensor that is already in memory, so a plan can mix loaded and lazy entries."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def _load(self) -> torch.Tensor:
        return self.tensor


class CastTensor(TensorRef):
    """`source` cast to `dtype`, computed when loaded."""

    def __init__(self, source: TensorRef, dtype: torch.dtype) -> None:
        self.source = source
        self.shape = tuple(source.shape)
        self.dtype = dtype

    def load(self, cache: LoadCache | None = None) -> torch.Tensor:
        return self.source.load(cache).to(self.dtype)

    def leaves(self) -> Iterator[TensorRef]:
        yield from self.source.leaves()


class PaddedRowsTensor(TensorRef):
    """`source` with zero rows appended along dim 0 up to `rows` rows."""

    def __init__(self, source: TensorRef, rows: int) -> None:
        self.source = source
        self.shape = (rows, *tuple(source.shape)[1:])
        self.dtype = source.dtype

    def load(self, cache: LoadCache | None = None) -> torch.Tensor:
        return pad_rows(self.source.load(cache), self.shape[0])

    def leaves(self) -> Iterator[TensorRef]:
        yield from self.source.leaves()


def is_lazy(value: object) -> bool:
    """Return whether `value` is a `TensorRef` rather than a loaded tensor."""
    return isinstance(value, TensorRef)


def as_ref(value: torch.Tensor | TensorRef) -> TensorRef:
    """Wrap a loaded tensor as a reference; return references unchanged."""
    return value if isinstance(value, TensorRef) else InMemoryTensor(value)


def load_tensor(value: torch.Tensor | TensorRef) -> torch.Tensor:
    """Return the values of a tensor or reference."""
    return value.load() if isinstance(value, TensorRef) else value


def pad_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows to `value` along dim 0 up to `rows` rows."""
    pad = value.new_zeros((rows - value.shape[0], *value.shape[1:]))
    return torch.cat([value, pad], dim=0)


def padded_rows(value: torch.Tensor | TensorRef, rows: int) -> torch.Tensor | TensorRef:
    """`pad_rows`, deferred when `value` is lazy."""
    return PaddedRowsTensor(value, rows) if is_lazy(value) else pad_rows(value, rows)


def prefetch(refs: Iterable[TensorRef]) -> LoadCache:
    """Load the source leaves of `refs` with one `load_many` call per source class.

    The returned cache is consumed by `ref.load(cache)`: each leaf is handed out once and then
    dropped, so the memory of a batch is freed tensor by tensor as it is written.
    """
    by_class: dict[type, list[SourceRef]] = {}
    seen: set[int] = set()
    for ref in refs:
        for leaf in ref.leaves():
            if isinstance(leaf, SourceRef) and id(leaf) not in seen:
                seen.add(id(leaf))
                by_class.setdefault(type(leaf), []).append(leaf)
    cache: LoadCache = {}
    for cls, leaves in by_class.items():
        for leaf, tensor in zip(leaves, cls.load_many(leaves)):
            cache[id(leaf)] = tensor
    return cache


def tensor_digest(value: torch.Tensor | TensorRef) -> str:
    """Return the SHA-256 of a tensor's dtype, shape and raw bytes.

    A lazy tensor with `byte_ranges` is hashed from its files through a small buffer; others are
    loaded.
    """
    digest = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
    ranges = value.byte_ranges() if is_lazy(value) else None
    if ranges is not None:
        for chunk in read_ranges(ranges):
            digest.update(chunk)
        return digest.hexdigest()
    tensor = load_tensor(value).contiguous()
    digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def tensors_equal(first: torch.Tensor | TensorRef, second: torch.Tensor | TensorRef) -> bool:
    """Return whether two tensors have the same dtype, shape and bytes, with one of them in memory at most.

    Lazy tensors with `byte_ranges` are compared piece by piece from their files and stop at the
    first difference. Others are compared by digest, each loaded and freed in turn. Equal bytes
    differs from torch.equal only on -0.0 against 0.0 (unequal bytes) and on NaN (equal bytes).
    """
    if (first.dtype, tuple(first.shape)) != (second.dtype, tuple(second.shape)):
        return False
    first_ranges = first.byte_ranges() if is_lazy(first) else None
    second_ranges = second.byte_ranges() if is_lazy(second) else None
    if first_ranges is None or second_ranges is None:
        return tensor_digest(first) == tensor_digest(second)
    pieces = zip(_read_blocks(first_ranges), _read_blocks(second_ranges))
    return all(first_piece == second_piece for first_piece, second_piece in pieces)


def _read_blocks(ranges: list[tuple[Path, int, int]], block_bytes: int = 16 * 1024 * 1024) -> Iterator[bytes]:
    # Blocks of the same sizes on both sides, so that two tensors split into different ranges
    # compare block by block. They start at 64 KiB and double: trained tensors usually differ in
    # the first block, which is then all that is read.
    size = 64 * 1024
    pending = bytearray()
    for piece in read_ranges(ranges, buffer_bytes=1024 * 1024):
        pending += piece
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
            size = min(2 * size, block_bytes)
    if pending:
        yield bytes(pending)


def read_ranges(ranges: list[tuple[Path, int, int]], *, buffer_bytes: int = 16 * 1024 * 1024) -> Iterator[memoryview]:
    """Yield the bytes of `(file, offset, length)` ranges in pieces of at most `buffer_bytes`.

    One buffer is reused, so each piece is valid only until the next one is requested.
    """
    buffer = bytearray(buffer_bytes)
    view = memoryview(buffer)
    for path, offset, length in ranges:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            remaining = length
            while remaining:
                count = handle.readinto(view[: min(remaining, buffer_bytes)])
                if not count:
                    raise OSError(f"{path} ended {remaining} bytes before the end of a tensor at offset {offset}")
                remaining -= count
                yield view[:count]
