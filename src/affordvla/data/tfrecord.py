"""TFRecord files and `tf.train.Example` messages, read and written without TensorFlow.

Framing of every record, as TensorFlow writes it::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with `masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32)` over CRC32C (Castagnoli). Both checksums are
verified; a mismatch names the file, the record number and its byte offset.

`Example` is decoded straight from the protobuf wire format: Example{features=1}, Features{map<string, Feature>
feature=1}, Feature{bytes_list=1 | float_list=2 | int64_list=3}, each a `repeated value=1`, accepting packed and
unpacked encodings.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c
import numpy as np

_MASK_DELTA = 0xA282EAD8


class TFRecordError(ValueError):
    """A TFRecord file or an Example inside it is corrupt; the message names the file and the record."""


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: str | Path, *, verify: bool = True) -> Iterator[bytes]:
    """The records of one file, streamed (one record in memory at a time)."""
    path = Path(path)
    with open(path, "rb") as f:
        index = 0
        while True:
            offset = f.tell()
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise TFRecordError(f"{path}: record {index} at byte {offset}: truncated header")
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if verify and masked_crc32c(length_bytes) != length_crc:
                raise TFRecordError(f"{path}: record {index} at byte {offset}: length checksum mismatch")
            (length,) = struct.unpack("<Q", length_bytes)
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise TFRecordError(f"{path}: record {index} at byte {offset}: truncated data ({len(data)} of "
                                    f"{length} bytes)")
            if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise TFRecordError(f"{path}: record {index} at byte {offset}: data checksum mismatch")
            yield data
            index += 1


def write_records(path: str | Path, records: Iterable[bytes]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data)))
    return path


# ------------------------------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a message; length-delimited values are bytes, varints ints."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("length-delimited field runs past the message")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _to_signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_feature(buf: bytes) -> list[bytes] | np.ndarray:
    for kind, _, payload in _fields(buf):
        if kind == 1:
            return [v for n, _, v in _fields(payload) if n == 1]
        if kind == 2:
            floats = bytearray()
            for n, _, v in _fields(payload):
                if n == 1:
                    floats += v  # packed (wire 2) or one fixed32 (wire 5): both raw little-endian float bytes
            return np.frombuffer(bytes(floats), dtype="<f4").copy()
        if kind == 3:
            ints = []
            for n, wire, v in _fields(payload):
                if n != 1:
                    continue
                if wire == 2:
                    pos = 0
                    while pos < len(v):
                        value, pos = _varint(v, pos)
                        ints.append(_to_signed64(value))
                else:
                    ints.append(_to_signed64(v))
            return np.array(ints, dtype=np.int64)
    return []  # a Feature with no list set


def parse_example(data: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """A serialized tf.train.Example -> {key: list of bytes | float32 array | int64 array}."""
    features: dict[str, list[bytes] | np.ndarray] = {}
    for number, _, features_msg in _fields(data):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features_msg):
            if entry_number != 1:
                continue
            key, value = None, b""
            for n, _, v in _fields(entry):
                if n == 1:
                    key = v.decode("utf-8")
                elif n == 2:
                    value = v
            if key is None:
                raise ValueError("feature map entry without a key")
            features[key] = _decode_feature(value)
    return features


def parse_example_record(data: bytes, where: str) -> dict[str, list[bytes] | np.ndarray]:
    try:
        return parse_example(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TFRecordError(f"{where}: not a tf.train.Example ({exc})") from None


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def encode_example(features: dict[str, list[bytes] | list[str] | np.ndarray | list[float] | list[int]]) -> bytes:
    """{key: values} -> a serialized Example, encoded as TensorFlow does (packed floats and ints). Byte strings
    and str become bytes_list; float arrays float_list; integer arrays int64_list."""
    entries = b""
    for key, values in features.items():
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            inner = _delimited(2, _delimited(1, np.asarray(values, dtype="<f4").tobytes()))
        elif isinstance(values, np.ndarray) and values.dtype.kind in "iub":
            inner = _delimited(3, _delimited(1, b"".join(_encode_varint(int(v)) for v in values.reshape(-1))))
        else:
            items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
            inner = _delimited(1, b"".join(_delimited(1, item) for item in items))
        entries += _delimited(1, _delimited(1, key.encode("utf-8")) + _delimited(2, inner))
    return _delimited(1, entries)


def count_records(path: str | Path) -> int:
    """Records in a file, counted from the length framing alone (seeks past each record's data, checksums not
    read): cheap enough to check every shard before training. A file cut mid-record raises TFRecordError."""
    path = Path(path)
    size = path.stat().st_size
    count = offset = 0
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                raise TFRecordError(f"{path}: record {count} at byte {offset}: truncated header (file cut short)")
            (length,) = struct.unpack("<Q", header[:8])
            end = offset + 12 + length + 4
            if end > size:
                raise TFRecordError(f"{path}: record {count} at byte {offset}: truncated data (file cut mid-record: "
                                    f"{size - offset - 12} of {length + 4} bytes)")
            f.seek(end)
            offset, count = end, count + 1
    return count
