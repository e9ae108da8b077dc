"""Copy byte ranges of checkpoint files into an output file, in the kernel and on several threads.

A weight file is assembled from many pieces: FSDP2 chunks inside `.distcp` files, entries of
safetensors files. Each piece is a `CopyJob`: `length` bytes from `source` at `source_offset` go
to `target_offset` in the output. The output is preallocated, then the jobs' bytes are cut into
`threads` contiguous stretches of equal size, each copied by one thread with positioned
`os.copy_file_range`, so the bytes never pass through the process and no thread waits for
another's position. The call releases the GIL, so the threads copy in parallel.

Why preallocate and why threads (measured on ext4, 4 GB of FSDP2 chunks with warm page cache,
see docs/benchmarks.md): appending to a growing file, one thread took 1.5 to 1.9 s against 1.0 to
1.3 s for `cp -r`. Into a preallocated file, two threads took 1.2 to 1.4 s. The pieces land at
other offsets within a page than they have in the checkpoint, because safetensors packs tensors
after a header of any length. That makes each copy slower than `cp`'s page-aligned one, and a
second thread makes up most of the difference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

# Two threads were the fastest on the 2-core machine of the benchmark, and four were no faster.
COPY_THREADS = 2
# Upper bound of one copy_file_range call, so that progress moves and a stop request is seen.
_CALL_BYTES = 64 * 1024 * 1024
_BUFFER_BYTES = 16 * 1024 * 1024
# Errors with which copy_file_range reports that it cannot copy between two files (another
# filesystem, an old kernel, a special file).
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


@dataclass(frozen=True)
class CopyJob:
    """`length` bytes of `source` from `source_offset`, to be written at `target_offset`."""

    source: Path
    source_offset: int
    length: int
    target_offset: int


def preallocate(fd: int, size: int, *, path: Path) -> None:
    """Reserve `size` bytes for the open file `fd`, failing now when the disk is too small.

    Uses Linux's fallocate(2) and falls back to ftruncate where it is not supported. Python's
    `os.posix_fallocate` is avoided because glibc emulates it on such filesystems, which its
    manual page calls inefficient (posix_fallocate(3), NOTES).
    """
    if size == 0:
        return
    error = errno.EOPNOTSUPP
    fallocate = _libc_fallocate()
    if fallocate is not None:
        if fallocate(fd, 0, 0, size) == 0:
            return
        error = ctypes.get_errno()
    if error in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise CheckpointError(
            f"cannot reserve {size / 1e6:.1f} MB for {path}: {os.strerror(error)}. Free space on that "
            "filesystem or write the export elsewhere with --output."
        )
    if error not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM):
        raise OSError(error, os.strerror(error), str(path))
    os.ftruncate(fd, size)


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """Return libc's fallocate, or None where the C library has none."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).fallocate
    except (OSError, AttributeError, TypeError):
        logger.debug("fallocate(2) is not available, so output files are sized with ftruncate")
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def split_jobs(jobs: list[CopyJob], parts: int) -> list[list[CopyJob]]:
    """Cut the concatenated bytes of `jobs` into at most `parts` stretches of equal size.

    A job that straddles a cut is split in two, so every stretch gets the same number of bytes.
    """
    total = sum(job.length for job in jobs)
    parts = max(1, min(parts, total))
    if parts == 1:
        return [list(jobs)] if jobs else []
    size = -(-total // parts)
    stretches: list[list[CopyJob]] = [[]]
    room = size
    for job in jobs:
        done = 0
        while done < job.length:
            if room == 0:
                stretches.append([])
                room = size
            take = min(room, job.length - done)
            stretches[-1].append(
                CopyJob(job.source, job.source_offset + done, take, job.target_offset + done)
            )
            done += take
            room -= take
    return stretches


def copy_jobs(
    jobs: list[CopyJob],
    target_fd: int,
    *,
    threads: int = COPY_THREADS,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Copy every job into the open file `target_fd`, with `threads` threads.

    `on_progress(bytes)` is called from the copying threads at once, so it must be thread-safe.
    The first error stops the other threads at their next call and is raised here. Setting
    `stop` from another thread ends the copy early, within one call of at most 64 MiB per
    thread, without an error.
    """
    stop = stop if stop is not None else threading.Event()

    def report(count: int) -> None:
        if on_progress is not None:
            on_progress(count)

    def run(stretch: list[CopyJob]) -> None:
        try:
            _copy_stretch(stretch, target_fd, report, stop)
        except BaseException:
            stop.set()
            raise

    stretches = split_jobs(jobs, threads)
    if len(stretches) <= 1:
        for stretch in stretches:
            _copy_stretch(stretch, target_fd, report, stop)
        return
    with ThreadPoolExecutor(max_workers=len(stretches), thread_name_prefix="range-copy") as pool:
        futures = [pool.submit(run, stretch) for stretch in stretches]
        errors = [future.exception() for future in futures]
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise first


def _copy_stretch(
    stretch: list[CopyJob], target_fd: int, report: Callable[[int], None], stop: threading.Event
) -> None:
    handles: dict[Path, int] = {}
    buffer: bytearray | None = None
    try:
        for job in stretch:
            if job.source not in handles:
                handles[job.source] = os.open(job.source, os.O_RDONLY)
            source_fd = handles[job.source]
            done = 0
            while done < job.length:
                if stop.is_set():
                    return
                want = min(job.length - done, _CALL_BYTES)
                count = None
                if buffer is None:
                    try:
                        count = os.copy_file_range(
                            source_fd, target_fd, want, job.source_offset + done, job.target_offset + done
                        )
                    except OSError as err:
                        if err.errno not in _NO_KERNEL_COPY:
                            raise
                        logger.debug("copy_file_range from %s failed (%s); copying through a buffer", job.source, err)
                        buffer = bytearray(_BUFFER_BYTES)
                if count is None:
                    count = _copy_through_buffer(
                        source_fd, target_fd, buffer, min(want, _BUFFER_BYTES), job.source_offset + done, job.target_offset + done
                    )
                if count == 0:
                    raise CheckpointError(
                        f"{job.source} ended {job.length - done} bytes early while copying a tensor from "
                        f"offset {job.source_offset}; the file is truncated, so copy the checkpoint again."
                    )
                done += count
                report(count)
    finally:
        for fd in handles.values():
            os.close(fd)


def _copy_through_buffer(source_fd: int, target_fd: int, buffer: bytearray, length: int, source_offset: int, target_offset: int) -> int:
    view = memoryview(buffer)[:length]
    count = os.preadv(source_fd, [view], source_offset)
    written = 0
    while written < count:
        written += os.pwrite(target_fd, view[written:count], target_offset + written)
    return count
