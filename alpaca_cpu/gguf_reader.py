"""A strict, fast reader for GGUF v3 files: header, metadata, tensor table, data offsets.

Model files come from strangers, so every number read from the file is checked before it is
used to allocate, loop, or index: counts and lengths against the bytes left in the file and
against sane limits, dimension counts, dimensions, type ids, offsets and alignment. Python
integers cannot overflow, and every product is bounded before it is trusted. A file that lies
gets a `ModelFileError` naming the file, the field (metadata key or tensor name) and its byte
offset, the value found and the value expected.

The file is memory-mapped read-only; tensor data is handed out as numpy views into the mapping
(no copy). A view keeps the mapping alive, so the mapping lives exactly as long as it is used.

Layout (all little-endian; see the GGUF spec in ggml's docs/gguf.md):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count   x (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, dims u64[n_dims], type u32, offset u64)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)

    string = length u64, UTF-8 bytes;  array = item_type u32, count u64, items
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import ModelFileError

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32

# Limits far above any real model, low enough that a lying file cannot make us loop or
# allocate absurdly. The file size bounds every count too (see _Parser.count).
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = (1 << 16) - 1  # the GGUF spec's bound on key length
MAX_STRING_BYTES = 1 << 26  # a chat template is a few KiB; a vocabulary entry a few bytes
# Array items become Python objects (~8-32 bytes each), so bound them well below the file size:
MAX_ARRAY_ITEMS = 1 << 22  # vocabularies and merge lists have ~10^5 entries (Gemma: 2.6 * 10^5)
MAX_METADATA_ITEMS = 1 << 23  # all array items of all keys together
MAX_ARRAY_DEPTH = 4  # arrays of arrays nest at most this deep
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME (64) less the terminating NUL
INT64_MAX = (1 << 63) - 1
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
MIN_TENSOR_ENTRY_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, 1 dim, type, offset

# Scalar value types: (struct format, numpy dtype for arrays).
_SCALARS: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.BOOL: (struct.Struct("<B"), np.dtype("<u1")),  # checked to be 0 or 1
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
# The fewest bytes one value of each type can occupy: bounds an array's count by the bytes left.
_MIN_BYTES: dict[GGUFValueType, int] = {
    **{t: s.size for t, (s, _) in _SCALARS.items()},
    GGUFValueType.STRING: 8,  # the length alone
    GGUFValueType.ARRAY: 12,  # item type + count
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_TENSOR_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, validated against the file."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: shape[0] (ne0) is the contiguous axis
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    info_offset: int  # byte offset of this entry in the tensor table


@dataclass
class GGUFFile:
    """A parsed, validated GGUF file. Tensor data stays in the read-only mapping."""

    path: Path
    size: int
    version: int
    alignment: int
    metadata: dict[str, Any]  # key -> str, int, float, bool, or (nested) list of those
    value_types: dict[str, GGUFValueType]  # key -> the value's type (ARRAY for arrays)
    array_types: dict[str, GGUFValueType]  # array key -> its items' type (ARRAY when nested)
    kv_offsets: dict[str, int]  # key -> byte offset of its entry
    tensor_table_offset: int
    data_offset: int  # start of the tensor data section (aligned)
    tensors: dict[str, TensorInfo]  # in file order
    _mm: mmap.mmap | None = field(default=None, repr=False)

    def tensor_data(self, tensor: str | TensorInfo) -> np.ndarray:
        """The tensor's bytes as a flat read-only uint8 view into the mapping (no copy)."""
        info = self.tensors[tensor] if isinstance(tensor, str) else tensor
        if info.nbytes == 0 or self._mm is None:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self._mm, np.uint8, count=info.nbytes, offset=info.offset)


def _describe(value: Any) -> str:
    """A value for an error message: hex too for big integers, strings clipped."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 16:
        return f"{value} (0x{value:x})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Parser:
    """Cursor over the mapped file; every read is bounds-checked first."""

    def __init__(self, path: Path, mm: mmap.mmap | bytes, size: int) -> None:
        self.path = path
        self.mm = mm
        self.size = size
        self.pos = 0
        self.items = 0  # array items read so far (MAX_METADATA_ITEMS)

    # -- errors ---------------------------------------------------------------------------
    def fail(self, what: str, offset: int, found: Any, expected: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what} at byte {offset}: found {_describe(found)}, "
                              f"expected {expected}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelFileError(
                f"{self.path}: truncated file: {what} at byte {self.pos} needs {n} bytes, but "
                f"the file ends at byte {self.size}")

    # -- primitives -----------------------------------------------------------------------
    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.mm, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.mm, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, max_bytes: int) -> str:
        start = self.pos
        n = self.u64(f"{what} (string length)")
        if n > max_bytes:
            raise self.fail(f"{what} (string length)", start, n, f"at most {max_bytes} bytes")
        self.need(n, f"{what} ({n}-byte string)")
        raw = self.mm[self.pos:self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, start + 8 + e.start, raw[e.start:e.start + 4],
                            "valid UTF-8") from None
        self.pos += n
        return text

    def count(self, what: str, min_item_bytes: int, limit: int) -> int:
        """A u64 count, bounded by `limit` and by the bytes left at `min_item_bytes` each."""
        start = self.pos
        n = self.u64(what)
        left = self.size - self.pos
        if n > limit:
            raise self.fail(what, start, n, f"at most {limit}")
        if n > left // min_item_bytes:  # checked before any loop or allocation
            raise self.fail(what, start, n, f"at most {left // min_item_bytes}: {left} bytes are "
                            f"left and each item takes at least {min_item_bytes} (truncated file "
                            "or wrong count)")
        return n

    def value_type(self, what: str) -> GGUFValueType:
        start = self.pos
        raw = self.u32(what)
        vtype = _VALUE_TYPES.get(raw)
        if vtype is None:
            raise self.fail(what, start, raw, f"a GGUF value type id in 0..{max(_VALUE_TYPES)}")
        return vtype

    # -- metadata values ------------------------------------------------------------------
    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype is GGUFValueType.STRING:
            return self.string(what, MAX_STRING_BYTES)
        if vtype is GGUFValueType.ARRAY:
            return self.array(what, depth + 1)
        fmt, _ = _SCALARS[vtype]
        start = self.pos
        self.need(fmt.size, f"{what} ({vtype.name} value)")
        (v,) = fmt.unpack_from(self.mm, self.pos)
        self.pos += fmt.size
        if vtype is GGUFValueType.BOOL:
            if v > 1:
                raise self.fail(what, start, v, "a BOOL byte of 0 or 1")
            return bool(v)
        return v

    def array(self, what: str, depth: int) -> list[Any]:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(what, self.pos, f"arrays nested {depth} deep",
                            f"at most {MAX_ARRAY_DEPTH} levels")
        itype = self.value_type(f"{what} (array item type)")
        n = self.count(f"{what} (array length)", _MIN_BYTES[itype],
                       min(MAX_ARRAY_ITEMS, MAX_METADATA_ITEMS - self.items))
        self.items += n
        if itype in _SCALARS:  # one bulk read; n * itemsize fits the file (checked by count)
            _, dtype = _SCALARS[itype]
            arr = np.frombuffer(self.mm, dtype, count=n, offset=self.pos)
            start = self.pos
            self.pos += n * dtype.itemsize
            if itype is GGUFValueType.BOOL:
                bad = np.flatnonzero(arr > 1)
                if bad.size:
                    i = int(bad[0])
                    raise self.fail(f"{what} item {i}", start + i, int(arr[i]),
                                    "a BOOL byte of 0 or 1")
                return arr.astype(bool).tolist()
            return arr.tolist()
        if itype is GGUFValueType.STRING:
            return self.string_array(what, n)
        return [self.array(f"{what} item {i}", depth + 1) for i in range(n)]

    def string_array(self, what: str, n: int) -> list[str]:
        # The hot loop of a real file (~10^5 vocabulary strings): locals only, one bounds check
        # per item; anything unusual goes through string(), which raises the precise error.
        mm, end, pos, unpack = self.mm, self.size, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(n):
            if end - pos >= 8:
                (length,) = unpack(mm, pos)
                if length <= end - pos - 8 and length <= MAX_STRING_BYTES:
                    try:
                        append(mm[pos + 8:pos + 8 + length].decode("utf-8"))
                        pos += 8 + length
                        continue
                    except UnicodeDecodeError:
                        pass
            self.pos = pos
            append(self.string(f"{what} item {i}", MAX_STRING_BYTES))  # raises here
            pos = self.pos
        self.pos = pos
        return out


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _read_header(p: _Parser) -> tuple[int, int, int]:
    """(version, tensor_count, kv_count), after checking magic and version."""
    if p.size == 0:
        raise ModelFileError(f"{p.path}: file is empty (0 bytes), expected a GGUF model file")
    magic = bytes(p.mm[:4])
    if magic != MAGIC[:len(magic)]:
        raise p.fail("magic", 0, magic, f"{MAGIC!r}: not a GGUF file")
    p.need(4, "magic")
    p.pos = 4
    version = p.u32("version")
    if version != VERSION:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if 1 <= swapped <= VERSION:  # e.g. 0x03000000: written on a big-endian machine
            raise p.fail("version", 4, version, f"{VERSION} in little-endian byte order "
                         f"(this is a big-endian GGUF v{swapped} file)")
        raise p.fail("version", 4, version, f"{VERSION} (only GGUF v3 files are supported)")
    tensor_count = p.count("tensor count", MIN_TENSOR_ENTRY_BYTES, MAX_TENSORS)
    kv_count = p.count("metadata key/value count", MIN_KV_BYTES, MAX_KV)
    return version, tensor_count, kv_count


def _read_metadata(p: _Parser, kv_count: int) -> tuple[dict[str, Any], dict[str, GGUFValueType],
                                                      dict[str, GGUFValueType], dict[str, int]]:
    metadata: dict[str, Any] = {}
    value_types: dict[str, GGUFValueType] = {}
    array_types: dict[str, GGUFValueType] = {}
    kv_offsets: dict[str, int] = {}
    for i in range(kv_count):
        entry = p.pos
        key = p.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if not key:
            raise p.fail(f"metadata key #{i}", entry, key, "a non-empty key")
        if key in metadata:
            raise p.fail(f"metadata key #{i}", entry, key,
                         f"unique keys (already defined at byte {kv_offsets[key]})")
        vtype = p.value_type(f"metadata key '{key}' (value type)")
        start = p.pos
        metadata[key] = p.value(vtype, f"metadata key '{key}'")
        value_types[key] = vtype
        if vtype is GGUFValueType.ARRAY:  # value() has checked the item type stored first
            array_types[key] = _VALUE_TYPES[_U32.unpack_from(p.mm, start)[0]]
        kv_offsets[key] = entry
    return metadata, value_types, array_types, kv_offsets


def _alignment(p: _Parser, metadata: dict[str, Any], value_types: dict[str, GGUFValueType],
               kv_offsets: dict[str, int]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    what, at = "metadata key 'general.alignment'", kv_offsets["general.alignment"]
    if value_types["general.alignment"] is not GGUFValueType.UINT32:
        raise p.fail(what, at, value_types["general.alignment"].name, "type UINT32")
    if alignment == 0 or alignment & (alignment - 1):
        raise p.fail(what, at, alignment, "a non-zero power of two")
    return alignment


@dataclass(frozen=True)
class _Entry:
    """A tensor table entry before the data section's start is known."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    rel_offset: int  # relative to the data section
    nbytes: int
    entry: int  # byte offset of the entry


def _read_tensor_entry(p: _Parser, i: int, alignment: int, seen: dict[str, int]) -> _Entry:
    entry = p.pos
    name = p.string(f"tensor #{i} name", MAX_TENSOR_NAME_BYTES)
    if not name:
        raise p.fail(f"tensor #{i} name", entry, name, "a non-empty name")
    if name in seen:
        raise p.fail(f"tensor #{i} name", entry, name,
                     f"unique tensor names (already defined at byte {seen[name]})")
    seen[name] = entry
    what = f"tensor '{name}'"

    at = p.pos
    n_dims = p.u32(f"{what} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise p.fail(f"{what} dimension count", at, n_dims, f"1 to {MAX_DIMS}")
    dims_at = p.pos
    p.need(8 * n_dims, f"{what} dimensions")
    shape = struct.unpack_from(f"<{n_dims}Q", p.mm, p.pos)
    p.pos += 8 * n_dims
    n_elements = 1
    for j, d in enumerate(shape):
        if not 1 <= d <= INT64_MAX:
            raise p.fail(f"{what} dimension {j}", dims_at + 8 * j, d, f"1 to {INT64_MAX}")
        n_elements *= d
        if n_elements > INT64_MAX:  # ggml counts elements in int64
            raise p.fail(f"{what} shape", dims_at, list(shape),
                         f"at most {INT64_MAX} elements in all")

    at = p.pos
    raw_type = p.u32(f"{what} type")
    qtype = _TENSOR_TYPES.get(raw_type)
    if qtype is None:
        raise p.fail(f"{what} type", at, raw_type, "a known GGML tensor type id")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise p.fail(f"{what} row length (dimension 0)", dims_at, shape[0],
                     f"a multiple of {block}, the {qtype.name} block size")
    nbytes = n_elements // block * block_bytes  # checked against the file in _place_tensors

    at = p.pos
    rel_offset = p.u64(f"{what} data offset")
    if rel_offset % alignment:
        raise p.fail(f"{what} data offset", at, rel_offset,
                     f"a multiple of the alignment {alignment}")
    return _Entry(name, qtype, tuple(shape), rel_offset, nbytes, entry)


def _place_tensors(p: _Parser, entries: list[_Entry], data_offset: int) -> dict[str, TensorInfo]:
    """Absolute offsets, each checked to lie inside the file and to overlap no other tensor."""
    tensors: dict[str, TensorInfo] = {}
    data_bytes = p.size - data_offset
    for e in entries:
        if e.rel_offset > data_bytes or e.nbytes > data_bytes - e.rel_offset:
            raise ModelFileError(
                f"{p.path}: tensor '{e.name}' data (table entry at byte {e.entry}): found "
                f"{e.nbytes} bytes of {e.type.name} data for shape {list(e.shape)} at data offset "
                f"{e.rel_offset} (file byte {data_offset + e.rel_offset}), expected data that "
                f"ends inside the file ({p.size} bytes): truncated file or wrong offset/shape")
        tensors[e.name] = TensorInfo(e.name, e.type, e.shape, data_offset + e.rel_offset,
                                     e.nbytes, e.entry)
    # Two tensors sharing bytes mean a corrupt table (llama.cpp refuses this too).
    spans = sorted(tensors.values(), key=lambda t: t.offset)
    for prev, cur in itertools.pairwise(spans):
        if cur.offset < prev.offset + prev.nbytes:
            raise ModelFileError(
                f"{p.path}: tensor '{cur.name}' data offset at byte {cur.info_offset}: found file "
                f"byte {cur.offset}, expected no overlap with tensor '{prev.name}' (bytes "
                f"{prev.offset}..{prev.offset + prev.nbytes - 1})")
    return tensors


def _parse(path: Path, mm: mmap.mmap | bytes, size: int) -> GGUFFile:
    p = _Parser(path, mm, size)
    version, tensor_count, kv_count = _read_header(p)
    metadata, value_types, array_types, kv_offsets = _read_metadata(p, kv_count)
    alignment = _alignment(p, metadata, value_types, kv_offsets)

    table_offset = p.pos
    seen: dict[str, int] = {}
    entries = [_read_tensor_entry(p, i, alignment, seen) for i in range(tensor_count)]

    data_offset = _align(p.pos, alignment)
    if entries and data_offset > size:
        raise ModelFileError(
            f"{path}: truncated file: alignment padding after the tensor table at byte {p.pos} "
            f"runs to byte {data_offset} (alignment {alignment}), but the file ends at byte {size}")
    tensors = _place_tensors(p, entries, data_offset)

    return GGUFFile(path=path, size=size, version=version, alignment=alignment,
                    metadata=metadata, value_types=value_types, array_types=array_types,
                    kv_offsets=kv_offsets,
                    tensor_table_offset=table_offset, data_offset=data_offset, tensors=tensors,
                    _mm=mm if isinstance(mm, mmap.mmap) else None)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Map and parse a GGUF v3 file, validating its structure (not what the model needs)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, expected a GGUF model file") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open the model file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{path}: is a directory, expected a GGUF model file")
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{path}: not a regular file, expected a GGUF model file")
        # mmap refuses empty files; the mapping keeps its own handle on the file.
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else b""
    except OSError as e:
        raise ModelFileError(f"{path}: cannot map the model file: {e}") from None
    finally:
        os.close(fd)
    return _parse(path, mm, st.st_size)
