"""TFRecord files and ``tf.train.Example`` records, read without TensorFlow.

A TFRecord file is a sequence of records, each
``uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)``
(little-endian; ``masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8``, TensorFlow's
``tensorflow/core/lib/hash/crc32c.h``). Both checksums are verified: the length's
always; the data's with the ``crc32c`` package when it is installed (the
``[tfds]`` extra, hardware CRC), else with the pure-Python table below (about
5 MB/s: minutes for a large test split), or skipped (``verify_data=False``)
for records that are skipped anyway.

``tf.train.Example`` (``tensorflow/core/example/{example,feature}.proto``) is
decoded from the protobuf wire format directly: ``Example{Features features = 1}``,
``Features{map<string, Feature> feature = 1}``, ``Feature{oneof: BytesList
bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3}``, each list
``repeated <type> value = 1`` (packed or not). The ``protobuf`` package alone
does not ship these message classes (TensorFlow does), and building them from
descriptors is more code than this decoder, so it is not used.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputError

_MASK_DELTA = 0xA282EAD8


def _table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_TABLE = _table()


def crc32c_py(data: bytes) -> int:
    """CRC-32C (Castagnoli), reflected, init and xor-out 0xffffffff."""
    crc, table = 0xFFFFFFFF, _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # the optional [tfds] extra
    from crc32c import crc32c as _fast_crc32c  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _fast_crc32c = None


def crc32c(data: bytes) -> int:
    return _fast_crc32c(data) if _fast_crc32c is not None else crc32c_py(data)


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(
    path: Path, wanted: Iterable[int] | None = None, verify_data: bool = True
) -> Iterator[tuple[int, bytes]]:
    """``(index, data)`` for each record of one file (only the ``wanted`` indices; others are seeked past)."""
    want = None if wanted is None else set(wanted)
    last = None if want is None else (max(want) if want else -1)
    with open(path, "rb") as f:
        index = 0
        while last is None or index <= last:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise InputError(f"{path}: truncated record header at record {index}")
            length, length_crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != length_crc:
                raise InputError(f"{path}: record {index}: length checksum mismatch (not a TFRecord file?)")
            if want is not None and index not in want:
                f.seek(length + 4, 1)
            else:
                data, tail = f.read(length), f.read(4)
                if len(data) < length or len(tail) < 4:
                    raise InputError(f"{path}: record {index} truncated")
                if verify_data and masked_crc(data) != struct.unpack("<I", tail)[0]:
                    raise InputError(f"{path}: record {index}: data checksum mismatch")
                yield index, data
            index += 1


def count_records(path: Path) -> int:
    """The number of records in one file (reads the headers only)."""
    n = 0
    with open(path, "rb") as f:
        while head := f.read(12):
            if len(head) < 12:
                raise InputError(f"{path}: truncated record header at record {n}")
            f.seek(struct.unpack("<Q", head[:8])[0] + 4, 1)
            n += 1
    return n


# ---------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)``: varints as int, length-delimited and fixed as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _int64s(buf: bytes) -> list[int]:
    out = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 2:  # packed
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                out.append(v - (1 << 64) if v >= 1 << 63 else v)
        else:
            out.append(value - (1 << 64) if value >= 1 << 63 else value)
    return out


def _floats(buf: bytes) -> list[float]:
    out: list[float] = []
    for number, wire, value in _fields(buf):
        if number == 1:  # packed (wire 2) or one fixed32 (wire 5)
            out.extend(struct.unpack(f"<{len(value) // 4}f", value))
    return out


def parse_example(data: bytes) -> dict[str, list]:
    """A serialized ``tf.train.Example`` -> ``{feature key: list of bytes | float | int}``."""
    out: dict[str, list] = {}
    try:
        for number, _, features in _fields(data):
            if number != 1:
                continue
            for fnum, _, entry in _fields(features):
                if fnum != 1:
                    continue
                key, feature = "", b""
                for enum, _, v in _fields(entry):
                    key, feature = (v.decode(), feature) if enum == 1 else (key, v if enum == 2 else feature)
                values: list = []
                for kind, _, payload in _fields(feature):
                    if kind == 1:
                        values = [v for n, _, v in _fields(payload) if n == 1]
                    elif kind == 2:
                        values = _floats(payload)
                    elif kind == 3:
                        values = _int64s(payload)
                out[key] = values
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise InputError(f"not a tf.train.Example record ({err})") from None
    return out
