"""The torch.save record reader against Python's zipfile, on DCP records and on crafted archives."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from speechlm_bridge.checkpoints.torch_save_record import entry_data_offset, read_entries, read_entry


def zipfile_view(data: bytes) -> dict[str, tuple[int, int, int, int]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {
            info.filename: (info.header_offset, info.compress_size, info.file_size, info.compress_type)
            for info in archive.infolist()
        }


def our_view(fd: int, offset: int, length: int) -> dict[str, tuple[int, int, int, int]]:
    return {
        name: (entry.header_offset, entry.compressed_size, entry.size, entry.method)
        for name, entry in read_entries(fd, offset, length).items()
    }


def embedded(tmp_path, record: bytes, *, before: int = 1000, after: int = 77) -> tuple[int, int, int]:
    """Write `record` between other bytes, as DCP places records in a `.distcp` file."""
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(b"x" * before + record + b"y" * after)
    return os.open(path, os.O_RDONLY), before, len(record)


def torch_record(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def test_dcp_records_match_zipfile(nemo_salm_dir):
    directory = nemo_salm_dir / "dcp" / "step=2"
    metadata = FileSystemReader(directory).read_metadata()
    checked = 0
    for info in metadata.storage_data.values():
        path = directory / info.relative_path
        data = path.read_bytes()[info.offset : info.offset + info.length]
        fd = os.open(path, os.O_RDONLY)
        try:
            assert our_view(fd, info.offset, info.length) == zipfile_view(data)
        finally:
            os.close(fd)
        checked += 1
    assert checked > 500


def test_storage_offset_and_pickle(tmp_path):
    tensor = torch.arange(1000, dtype=torch.bfloat16)
    record = torch_record(tensor)
    fd, offset, length = embedded(tmp_path, record)
    try:
        entries = read_entries(fd, offset, length)
        storage = next(entry for name, entry in entries.items() if name.endswith("/data/0"))
        start = entry_data_offset(fd, offset, storage)
        pickled = read_entry(fd, offset, next(e for n, e in entries.items() if n.endswith("/data.pkl")))
    finally:
        os.close(fd)

    assert record[start : start + 2000] == tensor.view(torch.uint8).numpy().tobytes()
    with zipfile.ZipFile(io.BytesIO(record)) as archive:
        assert pickled == archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def test_zip64_fields_match_zipfile(tmp_path, monkeypatch):
    # A zip64 limit of 100 bytes makes zipfile write the zip64 extra fields and end records
    # that a chunk over 4 GiB needs.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", b"p" * 150)
        archive.writestr("archive/data/0", bytes(range(256)) * 3)
        archive.writestr("archive/version", b"3")
    monkeypatch.undo()
    record = buffer.getvalue()
    assert b"PK\x06\x06" in record

    fd, offset, length = embedded(tmp_path, record)
    try:
        ours = our_view(fd, offset, length)
        storage = read_entries(fd, offset, length)["archive/data/0"]
        start = entry_data_offset(fd, offset, storage)
    finally:
        os.close(fd)

    assert ours == zipfile_view(record)
    assert ours["archive/data/0"][0] > 100
    assert record[start : start + 768] == bytes(range(256)) * 3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda record: record + b"comment", "no end-of-central-directory record"),
        (lambda record: record[:-30], "no end-of-central-directory record"),
        (lambda record: b"\0" * len(record), "no end-of-central-directory record"),
    ],
    ids=["trailing bytes", "cut end", "zeros"],
)
def test_damaged_records_raise(tmp_path, damage, message):
    record = damage(torch_record(torch.ones(10)))
    fd, offset, length = embedded(tmp_path, record)
    try:
        with pytest.raises(ValueError, match=message):
            read_entries(fd, offset, length)
    finally:
        os.close(fd)


def test_compressed_entry_raises(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", b"\0" * 4096)
    fd, offset, length = embedded(tmp_path, buffer.getvalue())
    try:
        entry = read_entries(fd, offset, length)["archive/data/0"]
        with pytest.raises(ValueError, match="compressed"):
            entry_data_offset(fd, offset, entry)
    finally:
        os.close(fd)


def test_record_beyond_file_end_raises(tmp_path):
    record = torch_record(torch.ones(10))
    fd, offset, length = embedded(tmp_path, record, after=0)
    try:
        with pytest.raises(ValueError, match="ends 5 bytes early"):
            read_entries(fd, offset + 5, length)
    finally:
        os.close(fd)


def test_entry_count_beyond_directory_raises(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data/0", b"\0" * 64)
    record = bytearray(buffer.getvalue())
    # The end record's entry counts (bytes 8 to 11 of its 22) claim a second entry.
    record[-14:-10] = (2).to_bytes(2, "little") * 2
    fd, offset, length = embedded(tmp_path, bytes(record))
    try:
        with pytest.raises(ValueError, match="truncated zip structure"):
            read_entries(fd, offset, length)
    finally:
        os.close(fd)
