"""The record format shared by the on-disk log and the DELIVER frame.

A record is one stored event. The queue writes records to segment files and later
sends the same bytes to shards unchanged, so an event is encoded once, when it is
appended, and never re-encoded on its way out.

Layout, all integers big-endian::

    u32  crc        CRC-32C of every byte after the length field
    u32  length     number of bytes after this field (34 + key length + value length)
    u64  offset     position of the record in its partition, assigned by the queue
    u64  timestamp  publish time, microseconds since the Unix epoch, set by the publisher
    u64  producer   id of the publishing producer, or 0 when it sent none
    u64  sequence   the producer's number for this event, counting from 1 (0 without id)
    u16  key_len    length of the key in bytes
    ...  key        UTF-8
    ...  value      the event, a JSON object in UTF-8

The producer id and sequence let the queue recognise an event that a producer sends
again after a lost acknowledgement, including after the queue itself restarted: the
log is the only place the queue needs to look (see ``evp.log``).

The checksum is CRC-32C (Castagnoli), the polynomial with hardware support on x86 and
ARM that Kafka, ext4 and iSCSI also use.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from crc32c import crc32c

PREFIX = struct.Struct(">II")  # crc, length
BODY_HEADER = struct.Struct(">QQQQH")  # offset, timestamp, producer, sequence, key_len
HEADER = struct.Struct(">IIQQQQH")
HEADER_BYTES = HEADER.size  # 42
BODY_HEADER_BYTES = BODY_HEADER.size  # 34
# Stored in each topic's metadata; a topic written in another format is refused.
FORMAT_VERSION = 2
MAX_KEY_BYTES = 0xFFFF


class CorruptRecord(Exception):
    """A record whose checksum or length does not match its bytes."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


class Record(NamedTuple):
    offset: int
    timestamp_us: int
    key: bytes
    value: bytes
    producer: int = 0
    sequence: int = 0


def encode(
    offset: int,
    timestamp_us: int,
    key: bytes,
    value: bytes,
    producer: int = 0,
    sequence: int = 0,
) -> bytes:
    """Encode one record, checksum included."""
    body = BODY_HEADER.pack(offset, timestamp_us, producer, sequence, len(key)) + key + value
    return PREFIX.pack(crc32c(body), len(body)) + body


def encode_batch(
    base_offset: int,
    entries: list[tuple[bytes, bytes, int]],
    producer: int = 0,
    sequences: list[int] | None = None,
) -> tuple[bytes, list[int]]:
    """Encode `(key, value, timestamp_us)` entries as consecutive records.

    `sequences`, when given, holds the producer's sequence number of each entry.
    Returns the bytes and the end position of each record within them, which lets the
    caller cut the batch at any record boundary without parsing it again.
    """
    parts: list[bytes] = []
    ends: list[int] = []
    position = 0
    pack_body = BODY_HEADER.pack
    pack_prefix = PREFIX.pack
    offset = base_offset
    numbers = sequences if sequences is not None else [0] * len(entries)
    for (key, value, timestamp_us), sequence in zip(entries, numbers, strict=True):
        body = pack_body(offset, timestamp_us, producer, sequence, len(key)) + key + value
        parts.append(pack_prefix(crc32c(body), len(body)))
        parts.append(body)
        position += 8 + len(body)
        ends.append(position)
        offset += 1
    return b"".join(parts), ends


def decode(buffer: bytes | memoryview, verify: bool = True) -> Iterator[Record]:
    """Yield the records in `buffer`, which must hold whole records only.

    Raises CorruptRecord on a bad checksum (when `verify` is set), on a length that
    runs past the end of the buffer, or on a key length that does not fit its record.
    """
    view = memoryview(buffer)
    end = len(view)
    position = 0
    unpack_prefix = PREFIX.unpack_from
    unpack_body = BODY_HEADER.unpack_from
    while position < end:
        if end - position < HEADER_BYTES:
            raise CorruptRecord(
                f"truncated record header at byte {position}: "
                f"{end - position} bytes left, a header needs {HEADER_BYTES}",
                position,
            )
        crc, length = unpack_prefix(view, position)
        body_start = position + 8
        body_end = body_start + length
        if length < BODY_HEADER_BYTES or body_end > end:
            raise CorruptRecord(
                f"record at byte {position} declares length {length}, "
                f"which does not fit the {end - body_start} bytes that follow",
                position,
            )
        body = view[body_start:body_end]
        if verify and crc32c(body) != crc:
            raise CorruptRecord(f"checksum mismatch in record at byte {position}", position)
        offset, timestamp_us, producer, sequence, key_len = unpack_body(body)
        key_end = BODY_HEADER_BYTES + key_len
        if key_end > length:
            raise CorruptRecord(
                f"record at byte {position} declares a key of {key_len} bytes "
                f"in a body of {length}",
                position,
            )
        yield Record(
            offset,
            timestamp_us,
            bytes(body[BODY_HEADER_BYTES:key_end]),
            bytes(body[key_end:]),
            producer,
            sequence,
        )
        position = body_end


def scan(
    buffer: bytes | memoryview,
    verify: bool = True,
    producers: dict[int, int] | None = None,
) -> tuple[list[int], list[int], int]:
    """Find whole, valid records at the start of `buffer`.

    Returns `(offsets, ends, stop)`: the offset and end position of each valid record,
    and the position where scanning stopped. `stop` is less than `len(buffer)` when the
    buffer ends in a partial record or when a record is corrupt, which is how recovery
    finds a torn tail. When `producers` is given, it maps each producer id of a valid
    record to the sequence of its last valid record in `buffer`.
    """
    view = memoryview(buffer)
    end = len(view)
    position = 0
    offsets: list[int] = []
    ends: list[int] = []
    unpack_prefix = PREFIX.unpack_from
    unpack_body = BODY_HEADER.unpack_from
    while end - position >= HEADER_BYTES:
        crc, length = unpack_prefix(view, position)
        body_end = position + 8 + length
        if length < BODY_HEADER_BYTES or body_end > end:
            break
        body = view[position + 8 : body_end]
        if verify and crc32c(body) != crc:
            break
        offset, _, producer, sequence, key_len = unpack_body(body)
        if BODY_HEADER_BYTES + key_len > length:
            break
        if producer and producers is not None:
            producers[producer] = sequence
        offsets.append(offset)
        ends.append(body_end)
        position = body_end
    return offsets, ends, position
