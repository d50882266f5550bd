"""Broken and hostile model files get a clear ModelFileError naming the field, never a crash.

The valid base is a tiny model written by tests/tiny_model.py; broken files are made from it by
cutting or patching bytes at offsets the strict reader reports, or are built by hand (`build`).
`gguf.GGUFReader` is the oracle for what valid files contain.
"""

from __future__ import annotations

import gc
import mmap
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from tiny_model import TinySpec, write_tiny_model

import alpaca_cpu
from alpaca_cpu.errors import ModelFileError
from alpaca_cpu.gguf_file import open_model_file, read_metadata
from alpaca_cpu.gguf_reader import (
    MAX_ARRAY_DEPTH,
    MAX_ARRAY_ITEMS,
    MAX_KV,
    MAX_TENSORS,
    MIN_KV_BYTES,
    MIN_TENSOR_ENTRY_BYTES,
    read_gguf,
)

BASE_SPEC = TinySpec(n_vocab=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                     wtype=T.Q8_0, context_length=64, seed=7)
VOCAB = ["<unk>", "<s>", "</s>", "▁the", "é", "日本", "\n", ""] + [f"t{i}" for i in range(8, 64)]
BASE_METADATA: dict[str, Any] = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": VOCAB,
    "tokenizer.ggml.scores": [-0.5 * i for i in range(64)],
    "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 61,
    "tokenizer.ggml.add_bos_token": True,
}
RNG_SEED = 1234


# ---- the base file and its layout ----------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """One metadata entry or tensor table entry: where it starts, where its name ends, its end."""

    index: int
    name: str
    start: int
    name_end: int  # first byte after the key / tensor name
    end: int


@dataclass(frozen=True)
class Base:
    data: bytes
    n_kv: int
    n_tensors: int
    kvs: list[Span]
    entries: list[Span]  # tensor table entries, in file order
    table_end: int
    data_offset: int
    tensors: list[tuple[str, int, int]]  # (name, absolute offset, nbytes) in file order

    def field_offset(self, kind: str, name: str, part: str) -> int:
        """Byte offset of a part of a metadata/tensor entry (see the layout in gguf_reader)."""
        span = next(s for s in (self.kvs if kind == "kv" else self.entries) if s.name == name)
        if kind == "kv":
            return {"key": span.start, "type": span.name_end, "value": span.name_end + 4}[part]
        (n_dims,) = struct.unpack_from("<I", self.data, span.name_end)
        dims = span.name_end + 4
        return {"name": span.start, "n_dims": span.name_end, "dims": dims,
                "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4}[part]

    def patched(self, offset: int, fmt: str, value: Any) -> bytes:
        out = bytearray(self.data)
        struct.pack_into(fmt, out, offset, value)
        return bytes(out)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return base_of(write_tiny_model(tmp_path_factory.mktemp("base") / "base.gguf", BASE_SPEC,
                                    BASE_METADATA))


# A file mixing every block type the engine runs, one per matrix (rows of 256 for K-quants).
MIXED_SPEC = TinySpec(n_vocab=64, dim=256, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=256,
                      wtype=T.Q4_K, context_length=64, seed=8, tensor_types=(
                          ("attn_q", T.Q2_K), ("attn_k", T.Q3_K), ("attn_v", T.Q5_K),
                          ("attn_output", T.Q6_K), ("ffn_gate", T.Q5_0), ("ffn_up", T.Q5_1),
                          ("ffn_down", T.IQ4_NL), ("output", T.Q8_0)))
# Where each block type keeps its scales (GGML's block structs): the byte offsets of its fp16
# fields (d, and dmin / m), and for K-quants the [start, end) of the packed sub-block scales.
FP16_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
               T.Q5_0: [0], T.Q5_1: [0, 2], T.IQ4_NL: [0], T.Q8_0: [0]}
SUB_SCALES = {T.Q2_K: (0, 16), T.Q3_K: (96, 108), T.Q4_K: (4, 16), T.Q5_K: (4, 16),
              T.Q6_K: (192, 208)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return base_of(write_tiny_model(tmp_path_factory.mktemp("mixed") / "mixed.gguf",
                                    MIXED_SPEC, BASE_METADATA))


def base_of(path: Path) -> Base:
    data = path.read_bytes()
    gf = read_gguf(path)
    keys = list(gf.kv_offsets)
    starts = [gf.kv_offsets[k] for k in keys] + [gf.tensor_table_offset]
    kvs = [Span(i, k, starts[i], starts[i] + 8 + len(k.encode()), starts[i + 1])
           for i, k in enumerate(keys)]
    infos = list(gf.tensors.values())
    ends = [t.info_offset for t in infos[1:]]
    last = infos[-1]
    table_end = last.info_offset + 8 + len(last.name) + 4 + 8 * len(last.shape) + 4 + 8
    entries = [Span(i, t.name, t.info_offset, t.info_offset + 8 + len(t.name),
                    (ends + [table_end])[i]) for i, t in enumerate(infos)]
    assert table_end < gf.data_offset, "the base file should have alignment padding"
    return Base(data, len(keys), len(infos), kvs, entries, table_end, gf.data_offset,
                [(t.name, t.offset, t.nbytes) for t in infos])


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def load_error(path: Path) -> str:
    """Load as a user would; return the ModelFileError's message (it must name the file)."""
    with pytest.raises(ModelFileError) as info:
        alpaca_cpu.Model(path, n_ctx=16, n_threads=1)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_base_file_loads_and_matches_gguf_reader(base: Base, tmp_path: Path) -> None:
    path = write(tmp_path, base.data)
    m = alpaca_cpu.Model(path, n_ctx=16, n_threads=1)
    assert np.isfinite(m.forward([1, 2, 3])).all()
    assert m.metadata["tokenizer.ggml.tokens"] == VOCAB
    assert m.metadata["tokenizer.ggml.scores"] == BASE_METADATA["tokenizer.ggml.scores"]
    oracle = GGUFReader(path)
    assert read_metadata(path) == {k: f.contents() for k, f in oracle.fields.items()
                                   if not k.startswith("GGUF.")}


# ---- truncation -----------------------------------------------------------------------------

def expected_field(b: Base, cut: int) -> str:
    """What the error for a file cut after `cut` bytes must name."""
    if cut < 4:
        return "magic"
    if cut < 8:
        return "version"
    # A count that cannot fit the bytes left is refused as soon as it is read.
    if cut < 16 or b.n_tensors * MIN_TENSOR_ENTRY_BYTES > cut - 16:
        return "tensor count"
    if cut < 24 or b.n_kv * MIN_KV_BYTES > cut - 24:
        return "metadata key/value count"
    for s in b.kvs:
        if s.start <= cut < s.end:
            return f"metadata key #{s.index}" if cut < s.name_end else f"metadata key '{s.name}'"
    for s in b.entries:
        if s.start <= cut < s.end:
            return f"tensor #{s.index} name" if cut < s.name_end else f"tensor '{s.name}'"
    if cut < b.data_offset:
        return "alignment padding"
    for name, offset, nbytes in b.tensors:
        if cut < offset + nbytes:
            return f"tensor '{name}' data"
    raise AssertionError(f"cut {cut} leaves the whole file")


def section_cuts(b: Base, section: str) -> list[int]:
    if section == "header":
        return [1, 2, 3, 4, 6, 8, 12, 16, 20, 24]
    if section == "metadata":
        return sorted({c for s in b.kvs
                       for c in (s.start, s.start + 4, s.start + 9, s.name_end, s.name_end + 2,
                                 s.name_end + 4, s.name_end + 5, s.end - 1)})
    if section == "tensor table":
        return sorted({c for s in b.entries
                       for c in (s.start, s.start + 4, s.start + 9, s.name_end, s.name_end + 2,
                                 s.name_end + 4, s.name_end + 11, s.end - 12, s.end - 9,
                                 s.end - 1)})
    if section == "padding":
        return list(range(b.table_end, b.data_offset))
    if section == "data":
        return sorted({b.data_offset} | {c for _, off, n in b.tensors
                                         for c in (off, off + 1, off + n - 1)})
    assert section == "random"
    rng = random.Random(RNG_SEED)
    return sorted(rng.sample(range(1, len(b.data)), 24))


@pytest.mark.parametrize("section", ["header", "metadata", "tensor table", "padding", "data",
                                     "random"])
def test_truncated_file_names_the_field(base: Base, tmp_path: Path, section: str) -> None:
    cuts = section_cuts(base, section)
    assert cuts
    wrong = []
    for cut in cuts:
        path = write(tmp_path, base.data[:cut], f"cut{cut}.gguf")
        message = load_error(path)
        field = expected_field(base, cut)
        if "truncated" not in message or field not in message:
            wrong.append(f"cut at {cut}: expected {field!r} and 'truncated' in: {message}")
    assert not wrong, "\n".join(wrong)


def test_truncation_messages_say_where(base: Base, tmp_path: Path) -> None:
    """A cut inside a key's value: the message names the key, the offset and the file end."""
    at = base.field_offset("kv", "tokenizer.ggml.model", "value")  # "llama": length, 5 bytes
    cut = at + 8 + 2
    message = load_error(write(tmp_path, base.data[:cut]))
    assert message.endswith(f"truncated file: metadata key 'tokenizer.ggml.model' (5-byte string)"
                            f" at byte {at + 8} needs 5 bytes, but the file ends at byte {cut}")


# ---- not GGUF at all --------------------------------------------------------------------------

def test_zero_length_file(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, b""))
    assert "file is empty (0 bytes)" in message


def test_missing_file_directory_and_fifo(tmp_path: Path) -> None:
    assert "no such model file" in load_error(tmp_path / "absent.gguf")
    (tmp_path / "dir.gguf").mkdir()
    assert "is a directory, expected a GGUF model file" in load_error(tmp_path / "dir.gguf")
    os.mkfifo(tmp_path / "fifo.gguf")  # opening it must not wait for a writer
    assert "not a regular file" in load_error(tmp_path / "fifo.gguf")


@pytest.mark.parametrize(("content", "found"), [
    (b"hello, this is a text file\n", "b'hell'"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64), "b'\\x89PNG'"),
    (b"PK\x03\x04" + bytes(100), "b'PK\\x03\\x04'"),
    (b"GGML" + bytes(100), "b'GGML'"),
    (b"ggufGGUF" + bytes(100), "b'gguf'"),
])
def test_not_a_gguf_file(tmp_path: Path, content: bytes, found: str) -> None:
    message = load_error(write(tmp_path, content))
    assert f"magic at byte 0: found {found}, expected b'GGUF': not a GGUF file" in message


@pytest.mark.parametrize(("version", "expected"), [
    (1, "found 1, expected 3 (only GGUF v3"),
    (2, "found 2, expected 3 (only GGUF v3"),
    (0, "found 0, expected 3"),
    (0x03000000, "big-endian GGUF v3 file"),
    (0xFFFFFFFF, "found 4294967295 (0xffffffff), expected 3"),
])
def test_other_gguf_versions(base: Base, tmp_path: Path, version: int, expected: str) -> None:
    message = load_error(write(tmp_path, base.patched(4, "<I", version)))
    assert "version at byte 4" in message and expected in message


def test_other_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = load_error(path)
    assert "metadata key 'general.architecture' = 'gpt2', expected 'llama'" in message


def test_missing_architecture(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, build([kv("llama.block_count", V.UINT32, u32(1))])))
    assert "missing metadata key 'general.architecture'" in message


# ---- lying numbers in an otherwise valid file -------------------------------------------------

# (id, (kind, entry name, part, extra offset), struct format, value, substrings of the message)
LIES: list[tuple[str, tuple[str, str, str, int], str, Any, list[str]]] = [
    ("tensor count 2^63", ("header", "", "", 8), "<Q", 1 << 63,
     ["tensor count at byte 8", "9223372036854775808 (0x8000000000000000)",
      f"expected at most {MAX_TENSORS}"]),
    ("tensor count too big for the file", ("header", "", "", 8), "<Q", 5000,
     ["tensor count at byte 8: found 5000", "truncated file or wrong count"]),
    ("kv count 2^63", ("header", "", "", 16), "<Q", 1 << 63,
     ["metadata key/value count at byte 16", f"expected at most {MAX_KV}"]),
    ("kv count 2^64-1", ("header", "", "", 16), "<Q", (1 << 64) - 1,
     ["metadata key/value count at byte 16", "18446744073709551615"]),
    ("kv count too big for the file", ("header", "", "", 16), "<Q", 4000,
     ["metadata key/value count at byte 16: found 4000", "truncated file or wrong count"]),
    ("array length 2^40", ("kv", "tokenizer.ggml.tokens", "value", 4), "<Q", 1 << 40,
     ["metadata key 'tokenizer.ggml.tokens' (array length)", "1099511627776",
      f"expected at most {MAX_ARRAY_ITEMS}"]),
    ("array length too big for the file", ("kv", "tokenizer.ggml.tokens", "value", 4), "<Q",
     1 << 20, ["metadata key 'tokenizer.ggml.tokens' (array length)", "found 1048576",
               "each item takes at least 8 (truncated file or wrong count)"]),
    ("numeric array length too big for the file", ("kv", "tokenizer.ggml.scores", "value", 4),
     "<Q", 1 << 20, ["metadata key 'tokenizer.ggml.scores' (array length)",
                     "each item takes at least 4"]),
    ("string length 2^62", ("kv", "general.architecture", "value", 0), "<Q", 1 << 62,
     ["metadata key 'general.architecture' (string length)", "4611686018427387904",
      "expected at most"]),
    ("string length past EOF", ("kv", "tokenizer.ggml.model", "value", 0), "<Q", 1 << 20,
     ["truncated file: metadata key 'tokenizer.ggml.model' (1048576-byte string)"]),
    ("key length 2^62", ("kv", "llama.block_count", "key", 0), "<Q", 1 << 62,
     ["metadata key #", "(string length)", "expected at most 65535 bytes"]),
    ("value type 13", ("kv", "llama.block_count", "type", 0), "<I", 13,
     ["metadata key 'llama.block_count' (value type)", "found 13",
      "expected a GGUF value type id"]),
    ("value type 2^32-1", ("kv", "llama.block_count", "type", 0), "<I", (1 << 32) - 1,
     ["metadata key 'llama.block_count' (value type)", "4294967295"]),
    ("array item type 99", ("kv", "tokenizer.ggml.tokens", "value", 0), "<I", 99,
     ["metadata key 'tokenizer.ggml.tokens' (array item type)", "found 99"]),
    ("bool byte 2", ("kv", "tokenizer.ggml.add_bos_token", "value", 0), "<B", 2,
     ["metadata key 'tokenizer.ggml.add_bos_token'", "found 2, expected a BOOL byte of 0 or 1"]),
    ("invalid UTF-8 in a key", ("kv", "llama.block_count", "key", 9), "<B", 0xFF,
     ["metadata key #", "expected valid UTF-8"]),
    ("invalid UTF-8 in a vocabulary entry", ("kv", "tokenizer.ggml.tokens", "value", 12 + 8),
     "<B", 0xC0, ["metadata key 'tokenizer.ggml.tokens' item 0", "expected valid UTF-8"]),
    ("tensor name length 2^62", ("tensor", "blk.0.attn_q.weight", "name", 0), "<Q", 1 << 62,
     ["name (string length)", "expected at most 63 bytes"]),
    ("n_dims 99", ("tensor", "blk.0.attn_q.weight", "n_dims", 0), "<I", 99,
     ["tensor 'blk.0.attn_q.weight' dimension count", "found 99, expected 1 to 4"]),
    ("n_dims 0", ("tensor", "blk.0.attn_q.weight", "n_dims", 0), "<I", 0,
     ["tensor 'blk.0.attn_q.weight' dimension count", "found 0, expected 1 to 4"]),
    ("dimension 2^63", ("tensor", "blk.0.attn_q.weight", "dims", 8), "<Q", 1 << 63,
     ["tensor 'blk.0.attn_q.weight' dimension 1", "9223372036854775808"]),
    ("dimension 0", ("tensor", "blk.0.attn_q.weight", "dims", 8), "<Q", 0,
     ["tensor 'blk.0.attn_q.weight' dimension 1", "found 0"]),
    ("dimension product overflows int64", ("tensor", "blk.0.attn_q.weight", "dims", 8), "<Q",
     1 << 60, ["tensor 'blk.0.attn_q.weight' shape", "[32, 1152921504606846976]",
               "elements in all"]),
    ("dimension product past EOF", ("tensor", "blk.0.attn_q.weight", "dims", 8), "<Q", 1 << 30,
     ["tensor 'blk.0.attn_q.weight' data", "shape [32, 1073741824]", "ends inside the file"]),
    ("row length not a multiple of the block", ("tensor", "blk.0.attn_q.weight", "dims", 0),
     "<Q", 33, ["tensor 'blk.0.attn_q.weight' row length (dimension 0)",
                "found 33, expected a multiple of 32, the Q8_0 block size"]),
    ("unknown type id 4", ("tensor", "blk.0.attn_q.weight", "type", 0), "<I", 4,
     ["tensor 'blk.0.attn_q.weight' type", "found 4, expected a known GGML tensor type id"]),
    ("unknown type id 2^31", ("tensor", "blk.0.attn_q.weight", "type", 0), "<I", 1 << 31,
     ["tensor 'blk.0.attn_q.weight' type", "2147483648"]),
    ("type with a bigger block", ("tensor", "blk.0.attn_q.weight", "type", 0), "<I", int(T.Q4_K),
     ["row length (dimension 0)", "a multiple of 256, the Q4_K block size"]),
    ("unsupported type", ("tensor", "blk.0.attn_q.weight", "type", 0), "<I", int(T.I8),
     [("tensor 'blk.0.attn_q.weight' has type I8, expected one of F16, F32, IQ4_NL, Q2_K, "
       "Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0")]),
    ("tensor offset past EOF", ("tensor", "output.weight", "offset", 0), "<Q", 1 << 40,
     ["tensor 'output.weight' data", "data offset 1099511627776", "ends inside the file"]),
    ("tensor offset 2^64-32", ("tensor", "output.weight", "offset", 0), "<Q", (1 << 64) - 32,
     ["tensor 'output.weight' data", "ends inside the file"]),
    ("misaligned tensor offset", ("tensor", "output.weight", "offset", 0), "<Q", 32 * 5 + 1,
     ["tensor 'output.weight' data offset", "found 161, expected a multiple of the alignment 32"]),
    ("overlapping tensors", ("tensor", "output_norm.weight", "offset", 0), "<Q", 0,
     ["tensor 'output_norm.weight' data offset", "found file byte",
      "expected no overlap with tensor 'token_embd.weight'"]),
]


@pytest.mark.parametrize(("where", "fmt", "value", "expected"),
                         [pytest.param(*lie[1:], id=lie[0]) for lie in LIES])
def test_lying_field_names_the_field(base: Base, tmp_path: Path, where: tuple[str, str, str, int],
                                     fmt: str, value: Any, expected: list[str]) -> None:
    kind, name, part, extra = where
    offset = extra if kind == "header" else base.field_offset(kind, name, part) + extra
    message = load_error(write(tmp_path, base.patched(offset, fmt, value)))
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"


def test_duplicate_tensor_name(base: Base, tmp_path: Path) -> None:
    # Rename blk.0.attn_k.weight to blk.0.attn_q.weight (same length): a duplicate entry.
    at = base.field_offset("tensor", "blk.0.attn_k.weight", "name") + 8 + len("blk.0.attn_")
    data = bytearray(base.data)
    data[at:at + 1] = b"q"
    first = base.field_offset("tensor", "blk.0.attn_q.weight", "name")
    message = load_error(write(tmp_path, bytes(data)))
    assert "'blk.0.attn_q.weight'" in message
    assert f"expected unique tensor names (already defined at byte {first})" in message


# ---- hand-built files -------------------------------------------------------------------------

def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def kv(key: str | bytes, vtype: V, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def arr(item_type: V, items: list[bytes]) -> bytes:
    return u32(item_type) + u64(len(items)) + b"".join(items)


def tensor_entry(name: str | bytes, dims: list[int], qtype: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(qtype) + u64(offset)


def build(kvs: list[bytes], entries: list[bytes] | None = None, data: bytes = b"",
          alignment: int = 32) -> bytes:
    """A GGUF v3 file from raw metadata entries, tensor table entries and data."""
    entries = entries or []
    head = b"GGUF" + u32(3) + u64(len(entries)) + u64(len(kvs)) + b"".join(kvs) + b"".join(entries)
    return head + bytes(-len(head) % alignment) + data


ARCH = kv("general.architecture", V.STRING, gstr("llama"))
NORM = tensor_entry("output_norm.weight", [8], T.F32, 0)


@pytest.mark.parametrize(("kvs", "entries", "expected"), [
    pytest.param([ARCH, kv("a.b", V.UINT32, u32(1)), kv("a.b", V.UINT32, u32(2))], [],
                 ["metadata key #2 at byte", "found 'a.b', expected unique keys (already defined"],
                 id="duplicate key"),
    pytest.param([ARCH, kv("", V.UINT8, b"\x01")], [], ["metadata key #1", "a non-empty key"],
                 id="empty key"),
    pytest.param([ARCH, kv("general.alignment", V.UINT32, u32(0))], [],
                 ["metadata key 'general.alignment'", "found 0, expected a non-zero power of two"],
                 id="alignment 0"),
    pytest.param([ARCH, kv("general.alignment", V.UINT32, u32(48))], [],
                 ["found 48, expected a non-zero power of two"], id="alignment 48"),
    pytest.param([ARCH, kv("general.alignment", V.UINT64, u64(32))], [],
                 ["metadata key 'general.alignment'", "found 'UINT64', expected type UINT32"],
                 id="alignment as UINT64"),
    pytest.param([ARCH, kv("x", V.ARRAY, arr(V.ARRAY, [arr(V.ARRAY, [arr(V.ARRAY, [
        arr(V.ARRAY, [arr(V.UINT8, [b"\x01"])])])])]))], [],
                 ["metadata key 'x' item 0 item 0 item 0 item 0", "arrays nested 5 deep",
                  f"at most {MAX_ARRAY_DEPTH} levels"], id="arrays nested too deep"),
    pytest.param([ARCH, kv("x", V.ARRAY, arr(V.BOOL, [b"\x01", b"\x00", b"\x07"]))], [],
                 ["metadata key 'x' item 2", "found 7, expected a BOOL byte of 0 or 1"],
                 id="bool array item 7"),
    pytest.param([ARCH], [NORM, tensor_entry("output_norm.weight", [8], T.F32, 32)],
                 ["tensor #1 name", "unique tensor names"], id="duplicate tensor"),
    pytest.param([ARCH], [tensor_entry("", [8], T.F32, 0)], ["tensor #0 name", "non-empty"],
                 id="empty tensor name"),
    pytest.param([ARCH], [tensor_entry("n" * 64, [8], T.F32, 0)],
                 ["tensor #0 name (string length)", "found 64, expected at most 63 bytes"],
                 id="tensor name too long"),
    pytest.param([ARCH], [tensor_entry(b"\xff\xfe", [8], T.F32, 0)],
                 ["tensor #0 name", "expected valid UTF-8"], id="tensor name not UTF-8"),
    pytest.param([ARCH], [tensor_entry("x", [8, 1, 1, 1, 1], T.F32, 0)],
                 ["tensor 'x' dimension count", "found 5, expected 1 to 4"], id="5 dims"),
    pytest.param([ARCH], [tensor_entry("x", [1 << 32, 1 << 32], T.F32, 0)],
                 ["tensor 'x' shape", "elements in all"], id="2^32 x 2^32"),
])
def test_hand_built_file_names_the_field(tmp_path: Path, kvs: list[bytes], entries: list[bytes],
                                         expected: list[str]) -> None:
    message = load_error(write(tmp_path, build(kvs, entries, bytes(64))))
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    align = kv("general.alignment", V.UINT32, u32(64))
    data = np.arange(8, dtype=np.float32).tobytes()
    entries = [tensor_entry("a", [8], T.F32, 0), tensor_entry("b", [8], T.F32, 64)]
    blob = build([ARCH, align], entries, data + bytes(32) + data[::-1], alignment=64)
    gf = read_gguf(write(tmp_path, blob))
    assert gf.alignment == 64 and gf.data_offset % 64 == 0
    assert gf.tensors["b"].offset == gf.data_offset + 64
    assert gf.tensor_data("a").tobytes() == data
    misaligned = build([ARCH, align], [tensor_entry("a", [8], T.F32, 32)], bytes(64), alignment=64)
    with pytest.raises(ModelFileError, match="found 32, expected a multiple of the alignment 64"):
        read_gguf(write(tmp_path, misaligned, "bad.gguf"))


# ---- valid files: same values as gguf.GGUFReader ----------------------------------------------

def reader_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def flatten(value: Any) -> Any:
    """gguf's ReaderField.contents() flattens nested arrays (a FIXME there); we keep nesting."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for inner in value for x in flatten(inner)]
    return value


def test_every_value_type_equals_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    w = GGUFWriter(str(path), "llama")
    scalars: dict[V, list[Any]] = {
        V.UINT8: [0, 255], V.INT8: [-128, 127], V.UINT16: [0, 65535], V.INT16: [-32768, 32767],
        V.UINT32: [0, (1 << 32) - 1], V.INT32: [-(1 << 31), (1 << 31) - 1],
        V.FLOAT32: [0.1, -3.25e38], V.UINT64: [0, (1 << 64) - 1],
        V.INT64: [-(1 << 63), (1 << 63) - 1], V.FLOAT64: [0.1, -1e300], V.BOOL: [True, False],
        V.STRING: ["", "héllo ▁日本\n\x00"],
    }
    for vtype, values in scalars.items():
        w.add_key_value(f"s.{vtype.name.lower()}", values[1], vtype)
        w.add_key_value(f"a.{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)
    w.add_key_value("nested.ints", [[1, 2, 3], [4], [5, 6]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("nested.strings", [["a", "bc"], ["d"]], V.ARRAY, sub_type=V.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = read_gguf(path).metadata
    theirs = reader_metadata(GGUFReader(path))
    assert list(ours) == list(theirs)
    for key in theirs:
        assert flatten(ours[key]) == theirs[key], key
        assert type(flatten(ours[key])) is type(theirs[key]), key
    assert ours["nested.ints"] == [[1, 2, 3], [4], [5, 6]]
    assert ours["s.float32"] == float(np.float32(-3.25e38)) and ours["a.uint64"][1] == (1 << 64) - 1
    assert ours["a.bool"] == [True, False] and ours["s.string"] == "héllo ▁日本\n\x00"


def test_empty_arrays_equal_gguf_reader(tmp_path: Path) -> None:
    path = write(tmp_path, build([ARCH, kv("e.u8", V.ARRAY, arr(V.UINT8, [])),
                                  kv("e.str", V.ARRAY, arr(V.STRING, [])),
                                  kv("e.nested", V.ARRAY, arr(V.ARRAY, [arr(V.INT32, [])]))]))
    ours = read_gguf(path).metadata
    assert ours == {"general.architecture": "llama", "e.u8": [], "e.str": [], "e.nested": [[]]}
    theirs = reader_metadata(GGUFReader(path))
    assert {k: flatten(v) for k, v in ours.items()} == theirs


TINY_SPECS = [TinySpec(), TinySpec(wtype=T.F16, n_kv_heads=2, tied=True, seed=1),
              TinySpec(wtype=T.Q4_0, dim=128, head_dim=64, n_heads=2, n_kv_heads=1, seed=2),
              TinySpec(wtype=T.Q4_1, embd_type=T.Q8_0, seed=3)]


@pytest.mark.parametrize("spec", TINY_SPECS, ids=["f32", "f16-tied", "q4_0-hd64", "q4_1-q8_0"])
def test_tiny_models_equal_gguf_reader(tmp_path: Path, spec: TinySpec) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", spec, BASE_METADATA)
    assert_same_as_gguf_reader(path)


@pytest.mark.real_model
def test_real_model_equals_gguf_reader(smollm2_path: Path) -> None:
    assert_same_as_gguf_reader(smollm2_path)


def assert_same_as_gguf_reader(path: Path) -> None:
    gf = read_gguf(path)
    oracle = GGUFReader(path)
    assert gf.metadata == reader_metadata(oracle)
    assert gf.data_offset == oracle.data_offset and gf.alignment == oracle.alignment
    assert list(gf.tensors) == [t.name for t in oracle.tensors]
    for t in oracle.tensors:
        ours = gf.tensors[t.name]
        assert (ours.type, ours.shape, ours.offset, ours.nbytes) == (
            t.tensor_type, tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
        assert np.array_equal(gf.tensor_data(ours), np.asarray(t.data).reshape(-1).view(np.uint8))


@pytest.mark.real_model
def test_real_model_opens(smollm2_path: Path) -> None:
    """Opening speed is measured in benchmarks/bench_load.py, not asserted here."""
    mf = open_model_file(smollm2_path)
    assert len(mf.metadata["tokenizer.ggml.tokens"]) == 49152 and len(mf.tensors) == 272


def test_tensor_views_keep_the_mapping_alive(base: Base, tmp_path: Path) -> None:
    path = write(tmp_path, base.data)
    mf = open_model_file(path)
    view = mf.tensors["output_norm.weight"].data
    _, offset, nbytes = next(t for t in base.tensors if t[0] == "output_norm.weight")
    del mf
    gc.collect()
    owner = view.base.obj if isinstance(view.base, memoryview) else view.base
    assert isinstance(owner, mmap.mmap)  # a view into the mapping, not a copy
    assert not view.flags.writeable and view.dtype == np.uint8 and view.shape == (nbytes,)
    assert view.tobytes() == base.data[offset:offset + nbytes]


# Types gguf lists that the engine does not support yet (block sizes 1, 256 and 256).
UNSUPPORTED = [T.BF16, T.IQ2_XXS, T.TQ1_0]


@pytest.mark.parametrize("qtype", UNSUPPORTED, ids=lambda t: t.name)
def test_unsupported_type_is_refused_naming_tensor_type_and_list(tmp_path: Path,
                                                                 qtype: T) -> None:
    spec = TinySpec(dim=256, ffn_dim=256, tensor_types=(("attn_k", qtype),))
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    with pytest.raises(ModelFileError) as e:
        alpaca_cpu.Model(path, n_ctx=16)
    assert (f"tensor 'blk.0.attn_k.weight' has type {qtype.name}, expected one of F16, F32, "
            "IQ4_NL, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0") in str(e.value)


# ---- files mixing block types; K-quant and Q5/IQ4_NL blocks cut short or with bad scales ----

def test_mixed_file_loads_every_block_type(mixed: Base, tmp_path: Path) -> None:
    path = write(tmp_path, mixed.data)
    mf = open_model_file(path)
    matrix_types = {t.type for t in mf.tensors.values() if t.rows > 1}
    assert matrix_types == set(FP16_SCALES)  # each block type at least once
    logits = alpaca_cpu.Model(path, n_ctx=16, n_threads=1).forward([1, 2, 3], all_logits=True)
    assert logits.shape == (3, MIXED_SPEC.n_vocab) and np.isfinite(logits).all()


def scale_cuts(b: Base, path: Path) -> list[tuple[int, str]]:
    """(cut, tensor) pairs: file ends inside a scale field of the first, a middle and the last
    block of every quantized tensor."""
    cuts = []
    for t in read_gguf(path).tensors.values():
        if t.type not in FP16_SCALES:
            continue
        block_bytes = GGML_QUANT_SIZES[t.type][1]
        n_blocks = t.nbytes // block_bytes
        inside = [f + 1 for f in FP16_SCALES[t.type]]
        if t.type in SUB_SCALES:
            lo, hi = SUB_SCALES[t.type]
            inside += [lo + 1, hi - 1]
        for block in sorted({0, n_blocks // 2, n_blocks - 1}):
            cuts += [(t.offset + block * block_bytes + i, t.name) for i in inside]
    return cuts


def test_cut_inside_block_scales_names_the_tensor(mixed: Base, tmp_path: Path) -> None:
    """A file that ends inside any block type's scale arrays: refused at load, naming the
    tensor whose data is short, before any kernel could read past the end."""
    cuts = scale_cuts(mixed, write(tmp_path, mixed.data, "whole.gguf"))
    assert len({name for _, name in cuts}) == len(FP16_SCALES)
    wrong = []
    for cut, name in cuts:
        message = load_error(write(tmp_path, mixed.data[:cut], f"cut{cut}.gguf"))
        if "truncated" not in message or f"tensor '{name}' data" not in message:
            wrong.append(f"cut at {cut} (in {name}): {message}")
    assert not wrong, "\n".join(wrong)


def test_type_needing_more_bytes_than_written_is_refused(mixed: Base, tmp_path: Path) -> None:
    """A tensor relabelled with a type whose rows need more bytes (Q8_0: 34 per 32 weights, more
    than any other block type) has less data in the file than its type needs: the loader sees it
    overlap the next tensor or run past the end, and refuses the file."""
    gf = read_gguf(write(tmp_path, mixed.data, "whole.gguf"))
    relabelled = [t for t in gf.tensors.values() if t.type in FP16_SCALES and t.type != T.Q8_0]
    assert {t.type for t in relabelled} == set(FP16_SCALES) - {T.Q8_0}
    for t in relabelled:
        message = load_error(write(tmp_path, mixed.patched(
            mixed.field_offset("tensor", t.name, "type"), "<I", int(T.Q8_0)), "relabel.gguf"))
        assert f"'{t.name}'" in message, message
        assert "expected no overlap" in message or "ends inside the file" in message, message


@pytest.mark.parametrize("qtype", sorted(FP16_SCALES), ids=lambda t: t.name)
def test_non_finite_block_scales_compute_without_crash(qtype: T) -> None:
    """NaN and infinite block scales (each fp16 field: d, and dmin / m) are only numbers to the
    kernels, a deliberate choice (docs/design.md, decision 1): they propagate into the rows they
    touch (as in the numpy twin), every other row is unchanged, and nothing reads out of bounds
    (the scales never index anything)."""
    from alpaca_cpu import _core, ggml_types
    from alpaca_cpu import quants as q
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    w = q.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    act = q.quantize(rng.standard_normal((2, cols)).astype(np.float32),
                     ggml_types.traits(int(qtype)).vec_dot_type)
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    for at in FP16_SCALES[qtype]:
        bad = w.copy()
        for row, v in zip((0, 2, 3), [np.nan, np.inf, -np.inf]):  # the second block of 3 rows
            bad[row, block_bytes + at:block_bytes + at + 2] = \
                np.array([v], np.float16).view(np.uint8)
        touched = (bad != w).reshape(rows, -1).any(axis=1)
        assert touched.tolist() == [True, False, True, True, False, False]
        expected = q.dequantize(bad, qtype, cols)
        for isa in alpaca_cpu.available_isas():
            assert np.array_equal(_core.dequantize(bad, int(qtype), cols, isa), expected,
                                  equal_nan=True)
            got = _core.gemm(int(qtype), bad, act, cols, isa)
            clean = _core.gemm(int(qtype), w, act, cols, isa)
            assert not np.isfinite(got[:, touched]).any()
            assert np.array_equal(got[:, ~touched], clean[:, ~touched])


def test_non_finite_scales_of_every_type_in_a_model_run(mixed: Base, tmp_path: Path) -> None:
    """The mixed file with NaN/inf in the fp16 scales of blocks 0, 5 and 10 of every quantized
    tensor, and its K-quant sub-block scales all ones: the forward pass runs to the end (the
    values reach the logits) instead of crashing or reading out of bounds. The tokens are those
    rows of token_embd (one block per row), so its bad blocks are read too."""
    path = write(tmp_path, mixed.data, "whole.gguf")
    data = bytearray(mixed.data)
    for t in read_gguf(path).tensors.values():
        if t.type not in FP16_SCALES:
            continue
        block_bytes = GGML_QUANT_SIZES[t.type][1]
        d_at = FP16_SCALES[t.type][0]  # d
        for i, v in enumerate([np.nan, np.inf, -np.inf]):
            at = t.offset + 5 * i * block_bytes
            if t.type in SUB_SCALES:  # the packed sub-block scales: every bit set
                lo, hi = SUB_SCALES[t.type]
                data[at + lo:at + hi] = b"\xff" * (hi - lo)
            data[at + d_at:at + d_at + 2] = np.array([v], np.float16).tobytes()
    bad = write(tmp_path, bytes(data), "bad.gguf")
    model = alpaca_cpu.Model(bad, n_ctx=16, n_threads=1)
    logits = model.forward([0, 5, 10], all_logits=True)
    assert logits.shape == (3, MIXED_SPEC.n_vocab)
    assert not np.isfinite(logits).all()
