"""Find the entries of a `torch.save` record from its zip central directory, in a few small reads.

DCP writes every tensor chunk as a `torch.save` record, which is a zip archive with entries such
as `archive/data.pkl` (the pickled view) and `archive/data/0` (the raw storage), at some offset
inside a `.distcp` file. To copy a chunk's bytes, the export needs where its storage starts and
the pickled view, for each of many thousand records. `zipfile` took about 75 us per record here,
because it builds an object per entry and reads through a buffered window. This reader makes a
few `pread` calls and parses the fixed-size zip structures with `struct`.

It reads what PyTorch's writer produces: no archive comment, zip64 end records, stored entries.
Anything else raises `ValueError`, and the caller then loads the tensor through `dcp.load`.
Layouts follow the zip specification (PKWARE's APPNOTE.TXT: section 4.3 for the records, 4.5.3
for the zip64 extra field).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

_END = struct.Struct("<4sHHHHIIH")  # end of central directory, 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes, just before the end record
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header, 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_ZIP64_EXTRA_ID = 0x0001
_MASK32 = 0xFFFFFFFF
_STORED = 0


@dataclass(frozen=True)
class RecordEntry:
    """One file of a zip record: its local header offset, sizes and compression method."""

    header_offset: int
    compressed_size: int
    size: int
    method: int


def read_entries(fd: int, offset: int, length: int) -> dict[str, RecordEntry]:
    """Return the entries of the zip record at `[offset, offset + length)` of the open file `fd`.

    Offsets in the result are relative to the record. Raises ValueError for a layout this reader
    does not handle.
    """
    try:
        return _read_entries(fd, offset, length)
    except struct.error as err:
        # A count or length that points past the bytes read: the record is damaged.
        raise ValueError(f"truncated zip structure ({err})") from err


def _read_entries(fd: int, offset: int, length: int) -> dict[str, RecordEntry]:
    tail_length = min(length, _END.size + _ZIP64_LOCATOR.size)
    tail = _pread(fd, tail_length, offset + length - tail_length)
    signature, _, _, _, count, directory_size, directory_offset, comment_length = _END.unpack_from(
        tail, tail_length - _END.size
    )
    if signature != b"PK\x05\x06" or comment_length:
        raise ValueError("no end-of-central-directory record at the end of the record")
    if _MASK32 in (directory_size, directory_offset) or count == 0xFFFF:
        if tail_length < _END.size + _ZIP64_LOCATOR.size:
            raise ValueError("record too short for its zip64 end record")
        locator, _, zip64_end_offset, _ = _ZIP64_LOCATOR.unpack_from(tail, 0)
        if locator != b"PK\x06\x07" or zip64_end_offset + _ZIP64_END.size > length:
            raise ValueError("invalid zip64 end-of-central-directory locator")
        zip64_end = _ZIP64_END.unpack(_pread(fd, _ZIP64_END.size, offset + zip64_end_offset))
        if zip64_end[0] != b"PK\x06\x06":
            raise ValueError("invalid zip64 end-of-central-directory record")
        count, directory_size, directory_offset = zip64_end[7], zip64_end[8], zip64_end[9]
    if directory_offset + directory_size > length:
        raise ValueError("the central directory lies outside the record")

    directory = _pread(fd, directory_size, offset + directory_offset)
    entries: dict[str, RecordEntry] = {}
    position = 0
    for _ in range(count):
        fields = _CENTRAL.unpack_from(directory, position)
        if fields[0] != b"PK\x01\x02":
            raise ValueError("invalid central directory file header")
        method, compressed_size, size = fields[4], fields[8], fields[9]
        name_length, extra_length, comment_length = fields[10], fields[11], fields[12]
        header_offset = fields[16]
        name_start = position + _CENTRAL.size
        name = directory[name_start : name_start + name_length].decode("utf-8")
        extra = directory[name_start + name_length : name_start + name_length + extra_length]
        size, compressed_size, header_offset = _zip64_values(extra, size, compressed_size, header_offset)
        entries[name] = RecordEntry(header_offset, compressed_size, size, method)
        position = name_start + name_length + extra_length + comment_length
    return entries


def entry_data_offset(fd: int, offset: int, entry: RecordEntry) -> int:
    """Return where the bytes of a stored `entry` start, relative to the record at `offset`."""
    if entry.method != _STORED:
        raise ValueError(f"entry is compressed (method {entry.method})")
    header = _LOCAL.unpack(_pread(fd, _LOCAL.size, offset + entry.header_offset))
    if header[0] != b"PK\x03\x04":
        raise ValueError("invalid local file header")
    name_length, extra_length = header[9], header[10]
    return entry.header_offset + _LOCAL.size + name_length + extra_length


def read_entry(fd: int, offset: int, entry: RecordEntry) -> bytes:
    """Return the bytes of a stored `entry` of the record at `offset`."""
    return _pread(fd, entry.size, offset + entry_data_offset(fd, offset, entry))


def _zip64_values(extra: bytes, size: int, compressed_size: int, header_offset: int) -> tuple[int, int, int]:
    # A zip64 extra field lists, in this order, only the values whose 32-bit field is all ones.
    needed = [value == _MASK32 for value in (size, compressed_size, header_offset)]
    if not any(needed):
        return size, compressed_size, header_offset
    position = 0
    while position + 4 <= len(extra):
        field_id, field_length = struct.unpack_from("<HH", extra, position)
        if field_id == _ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{field_length // 8}Q", extra, position + 4))
            resolved = []
            for value, is_needed in zip((size, compressed_size, header_offset), needed):
                if is_needed:
                    if not values:
                        raise ValueError("zip64 extra field is too short")
                    value = values.pop(0)
                resolved.append(value)
            return resolved[0], resolved[1], resolved[2]
        position += 4 + field_length
    raise ValueError("zip64 sizes announced but no zip64 extra field")


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ValueError(f"the file ends {length - len(data)} bytes early at offset {offset}")
    return data
