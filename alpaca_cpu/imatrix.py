"""Importance matrices: how much each input column of each weight matrix matters.

For a matrix W (rows, cols) applied to activations a (tokens, cols), the error that quantizing
W adds to the output is sum_c (W - Q(W))[r, c] * a[t, c]; with columns uncorrelated its mean
square is sum_c (W - Q(W))[r, c]^2 * E[a_c^2]. E[a_c^2], the mean of squared activations over
a calibration text, is the importance of column c: the weight the error-minimising quantizer
gives each column's squared error (alpaca_convert, --imatrix).

Files use llama.cpp's imatrix format, so that they interoperate both ways with
`llama-imatrix` and `llama-quantize --imatrix` (tools/imatrix/imatrix.cpp, read at 0c1e570):
- GGUF (what llama-imatrix writes by default, and what `write_imatrix` writes): general.type =
  "imatrix", imatrix.datasets (strings), imatrix.chunk_count and imatrix.chunk_size (u32);
  per weight, F32 tensors "<weight>.in_sum2" (cols, 1): the sum of squared activations, and
  "<weight>.counts" (1, 1): the number of activation rows summed.
- legacy .dat (older llama.cpp; read only): int32 entry count; per entry int32 name length,
  name, int32 ncall, int32 nval, nval float32 = mean * ncall; then int32 chunk count and the
  dataset name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


class ImatrixError(ValueError):
    """An importance-matrix file that cannot be read or data that cannot be written."""


@dataclass
class Imatrix:
    """Per weight name ("blk.0.attn_q.weight"): sum of squared inputs (cols,) and row count."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # float64 (cols,)
    counts: dict[str, float] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def add(self, name: str, x: np.ndarray) -> None:
        """Accumulate activation rows x (tokens, cols) that multiply the weight `name`."""
        sq = np.einsum("tc,tc->c", x, x, dtype=np.float64)
        if name in self.sums:
            if self.sums[name].shape != sq.shape:
                raise ImatrixError(f"{name}: inputs of {sq.shape[0]} columns, earlier "
                                   f"{self.sums[name].shape[0]}")
            self.sums[name] += sq
            self.counts[name] += x.shape[0]
        else:
            self.sums[name] = sq
            self.counts[name] = float(x.shape[0])

    def importance(self, name: str) -> np.ndarray | None:
        """Mean squared input per column of the weight `name` (float32), None if absent."""
        if name not in self.sums or self.counts[name] <= 0:
            return None
        return (self.sums[name] / self.counts[name]).astype(np.float32)

    def __len__(self) -> int:
        return len(self.sums)


def write_imatrix(path: str | os.PathLike[str], im: Imatrix) -> None:
    """Write `im` as a GGUF imatrix file (llama-imatrix's format; entries sorted by name)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="imatrix", endianess=gguf.GGUFEndian.LITTLE)
    # GGUFWriter adds general.architecture; llama.cpp's reader ignores it (it keys on the
    # tensors and the imatrix.* values). general.type says what the file is.
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets))
    w.add_uint32("imatrix.chunk_count", im.chunk_count)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.sums):
        sums = im.sums[name].astype(np.float32).reshape(1, -1)
        w.add_tensor(name + SUMS_SUFFIX, sums)
        w.add_tensor(name + COUNTS_SUFFIX, np.array([[im.counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix file (llama.cpp's formats); ImatrixError naming the
    file and the field when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImatrixError(f"{path}: cannot read: {e}") from None
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ImatrixError(f"{path}: not a readable GGUF file: {e}") from None
    im = Imatrix()

    def field_value(key: str) -> object | None:
        f = r.get_field(key)
        return None if f is None else f.contents()

    datasets = field_value("imatrix.datasets")
    im.datasets = [str(d) for d in datasets] if isinstance(datasets, list) else []
    im.chunk_count = int(field_value("imatrix.chunk_count") or 0)
    im.chunk_size = int(field_value("imatrix.chunk_size") or 0)
    tensors = {t.name: t for t in r.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(SUMS_SUFFIX):
            continue
        name = tname[: -len(SUMS_SUFFIX)]
        ct = tensors.get(name + COUNTS_SUFFIX)
        if ct is None:
            raise ImatrixError(f"{path}: tensor {tname} has no {name + COUNTS_SUFFIX}")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or \
                ct.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {tname} or its counts is not F32")
        counts = np.asarray(ct.data, dtype=np.float64).reshape(-1)
        if counts.size != 1:
            raise ImatrixError(f"{path}: {name + COUNTS_SUFFIX} has {counts.size} counts (an "
                               "expert matrix); only dense models are supported")
        sums = np.asarray(t.data, dtype=np.float64).reshape(-1)
        if not np.isfinite(sums).all() or (sums < 0).any() or not counts[0] >= 0:
            raise ImatrixError(f"{path}: tensor {tname} has negative or non-finite values")
        im.sums[name] = sums
        im.counts[name] = float(counts[0])
    if not im.sums:
        raise ImatrixError(f"{path}: no '*{SUMS_SUFFIX}' tensors: not an imatrix file")
    return im


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path}: truncated legacy imatrix file at byte {pos} ({what})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    im = Imatrix()
    (n_entries,) = take("<i", "entry count")
    if n_entries < 1 or n_entries > 1 << 20:
        raise ImatrixError(f"{path}: not an imatrix file (GGUF or legacy .dat): entry count "
                           f"{n_entries}")
    for _ in range(n_entries):
        (length,) = take("<i", "name length")
        if length < 1 or length > 4096:
            raise ImatrixError(f"{path}: bad name length {length} at byte {pos - 4}")
        name = bytes(take(f"<{length}s", "name")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii", f"{name}: ncall, nval")
        if nval < 1 or nval > 1 << 24:
            raise ImatrixError(f"{path}: {name}: bad value count {nval}")
        if pos + 4 * nval > len(data):
            raise ImatrixError(f"{path}: truncated legacy imatrix file in {name}'s values")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        # values are mean * ncall: keep them as sums over ncall "rows" so importance = mean
        im.sums[name] = values
        im.counts[name] = float(ncall) if ncall > 0 else 1.0
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i", "chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "dataset name length")
            if 0 < length <= len(data) - pos:
                im.datasets = [bytes(take(f"<{length}s", "dataset")[0]).decode("utf-8",
                                                                               "replace")]
    return im
