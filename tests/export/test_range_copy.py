"""Threaded range copies into a preallocated file, and the writer that uses them on a real DCP checkpoint."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from speechlm_bridge.checkpoints import read_checkpoint
from speechlm_bridge.checkpoints.lazy import TensorRef
from speechlm_bridge.errors import CheckpointError
from speechlm_bridge.export import range_copy
from speechlm_bridge.export.range_copy import CopyJob, copy_jobs, preallocate, split_jobs
from speechlm_bridge.export.safetensors_writer import plan_shards, write_shard


def random_jobs(tmp_path: Path, *, seed: int = 0) -> tuple[list[CopyJob], bytes]:
    """Pieces of two source files at odd offsets, placed back to back after a 13-byte gap."""
    rng = random.Random(seed)
    sources = []
    for number in range(2):
        path = tmp_path / f"source{number}.bin"
        path.write_bytes(rng.randbytes(300_000))
        sources.append(path)
    jobs, expected, target = [], bytearray(b"\0" * 13), 13
    for _ in range(40):
        source = rng.choice(sources)
        offset = rng.randrange(0, 200_000)
        length = rng.randrange(1, 90_000)
        jobs.append(CopyJob(source, offset, length, target))
        expected += source.read_bytes()[offset : offset + length]
        target += length
    return jobs, bytes(expected)


def run_copy(tmp_path: Path, jobs: list[CopyJob], size: int, **options) -> bytes:
    target = tmp_path / "target.bin"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        preallocate(fd, size, path=target)
        copy_jobs(jobs, fd, **options)
    finally:
        os.close(fd)
    return target.read_bytes()


def test_split_jobs_equal_stretches(tmp_path):
    jobs, _ = random_jobs(tmp_path)
    total = sum(job.length for job in jobs)

    stretches = split_jobs(jobs, 3)

    assert [sum(job.length for job in stretch) for stretch in stretches[:2]] == [-(-total // 3)] * 2
    pieces = [job for stretch in stretches for job in stretch]
    assert len(pieces) == len(jobs) + 2  # two jobs straddle a cut
    for before, after in zip(pieces, pieces[1:]):
        assert after.target_offset == before.target_offset + before.length
    # Each piece reads the same source bytes its job would have written at that target offset.
    for piece in pieces:
        job = next(j for j in jobs if j.target_offset <= piece.target_offset < j.target_offset + j.length)
        assert piece.source == job.source
        assert piece.source_offset - job.source_offset == piece.target_offset - job.target_offset
        assert piece.target_offset + piece.length <= job.target_offset + job.length


def test_split_jobs_no_empty_stretch():
    jobs = [CopyJob(Path("a"), 0, 2, 0)]

    assert [len(stretch) for stretch in split_jobs(jobs, 8)] == [1, 1]
    assert split_jobs([], 4) == []


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_copies_equal_the_source_bytes(tmp_path, threads):
    jobs, expected = random_jobs(tmp_path)
    seen = []

    copied = run_copy(tmp_path, jobs, len(expected), threads=threads, on_progress=seen.append)

    assert copied == expected
    assert sum(seen) == len(expected) - 13


def test_buffer_copy_without_kernel_copy(tmp_path, monkeypatch):
    jobs, expected = random_jobs(tmp_path, seed=1)
    calls = []

    def reject_copy(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(range_copy.os, "copy_file_range", reject_copy)
    monkeypatch.setattr(range_copy, "_BUFFER_BYTES", 4096)

    assert run_copy(tmp_path, jobs, len(expected), threads=2) == expected
    # Each thread tries the kernel copy once, then stays with its buffer.
    assert len(calls) == 2


def test_truncated_source_is_named(tmp_path):
    source = tmp_path / "__1_0.distcp"
    source.write_bytes(b"x" * 1000)
    jobs = [CopyJob(source, 0, 500, 0), CopyJob(source, 800, 500, 500)]

    with pytest.raises(CheckpointError, match=r"__1_0\.distcp ended 300 bytes early .* offset 800; the file is truncated"):
        run_copy(tmp_path, jobs, 1000, threads=2)


def test_missing_source_raises(tmp_path):
    jobs = [CopyJob(tmp_path / "missing.distcp", 0, 10, 0)]

    with pytest.raises(FileNotFoundError, match="missing.distcp"):
        run_copy(tmp_path, jobs, 10, threads=2)


def test_preallocate_falls_back_to_ftruncate(tmp_path, monkeypatch):
    monkeypatch.setattr(range_copy, "_libc_fallocate", lambda: None)
    target = tmp_path / "model.safetensors"
    with open(target, "wb") as handle:
        preallocate(handle.fileno(), 12345, path=target)

    assert target.stat().st_size == 12345


def test_preallocate_full_disk(tmp_path, monkeypatch):
    def full(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(range_copy, "_libc_fallocate", lambda: full)
    target = tmp_path / "model.safetensors"
    with open(target, "wb") as handle, pytest.raises(
        CheckpointError, match=r"cannot reserve 5000\.0 MB for .*model\.safetensors: No space left on device\. Free space"
    ):
        preallocate(handle.fileno(), 5 * 10**9, path=target)


def test_preallocate_reserves_blocks(tmp_path):
    target = tmp_path / "model.safetensors"
    with open(target, "wb") as handle:
        preallocate(handle.fileno(), 1 << 20, path=target)

    assert target.stat().st_size == 1 << 20
    # fallocate, unlike ftruncate, gives the file its blocks now (st_blocks counts 512-byte units).
    if range_copy._libc_fallocate() is not None:
        assert target.stat().st_blocks * 512 >= 1 << 20


@pytest.mark.parametrize("copy_threads", [1, 3])
def test_dcp_shard_equals_save_file(tmp_path, nemo_salm_dir, copy_threads):
    """FSDP2 chunks copied by several threads give the bytes safetensors writes for the loaded tensors."""
    lazy = read_checkpoint(nemo_salm_dir / "dcp" / "step=2", lazy=True).state_dict
    copied = [name for name, ref in lazy.items() if ref.byte_ranges() is not None]
    assert len(copied) > 100
    loaded = read_checkpoint(nemo_salm_dir / "dcp" / "step=2").state_dict
    save_file({name: t.contiguous() for name, t in loaded.items()}, tmp_path / "reference.safetensors", metadata={"format": "pt"})

    shard = plan_shards(lazy, max_shard_size=10**10)[0]
    written = write_shard(shard, tmp_path, copy_threads=copy_threads)

    data = (tmp_path / "model.safetensors").read_bytes()
    assert written == len(data)
    assert data == (tmp_path / "reference.safetensors").read_bytes()
    assert all(isinstance(t, torch.Tensor) for t in loaded.values())


class FileBytes(TensorRef):
    """A uint8 tensor whose bytes are a whole file, so the writer copies it without loading."""

    dtype = torch.uint8

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shape = (path.stat().st_size,)

    def byte_ranges(self):
        return [(self.path, 0, self.shape[0])]


class BrokenLoad(TensorRef):
    """A tensor the writer must load, whose loading fails."""

    shape = (4,)
    dtype = torch.float32

    def load(self, cache=None):
        raise CheckpointError("broken.weight cannot be read")


def test_failed_load_stops_the_copy(tmp_path, monkeypatch):
    source = tmp_path / "__0_0.distcp"
    with open(source, "wb") as handle:
        handle.truncate(256 * 1024 * 1024)
    copied = []
    real_copy = os.copy_file_range

    def counting_copy(*args):
        count = real_copy(*args)
        copied.append(count)
        return count

    monkeypatch.setattr(range_copy.os, "copy_file_range", counting_copy)
    monkeypatch.setattr(range_copy, "_CALL_BYTES", 1024 * 1024)
    shard = plan_shards({"a.weight": FileBytes(source), "b.weight": BrokenLoad()}, max_shard_size=10**10)[0]
    output = tmp_path / "out"
    output.mkdir()

    with pytest.raises(CheckpointError, match="broken.weight cannot be read"):
        write_shard(shard, output, copy_threads=2)

    # The copy stops a few 1 MiB calls after the failed load, far short of the 256 MiB file.
    assert sum(copied) < 64 * 1024 * 1024
