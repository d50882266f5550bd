"""Reading checkpoint tensors safely: safetensors by hand (no torch), pickles only as weights.

Checkpoints are untrusted. safetensors headers are checked before any data is read, and data is
read with plain file reads into a fresh array (no mmap: mapped pages would count as resident
memory for the whole model). Pickles (`.pth`, `.bin`) go through `torch.load(weights_only=True)`,
which refuses any pickle that would call code; they are memory-mapped and each tensor's pages
are released once it has been converted.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import struct
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConvertError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> numpy dtype of the stored bits. BF16 is read as uint16 and widened.
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_MAX_HEADER = 100 << 20  # bytes; real headers are a few hundred KB
_CHUNK = 1 << 22  # values converted per step when the stored type is not float32


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """The tensors of one .safetensors file, read one at a time as float32."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ConvertError(f"{path}: safetensors header length {n} is larger than the "
                                   f"file ({size} bytes) allows")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ConvertError(f"{path}: safetensors header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        data_size = size - self._data_start
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.tensors[name] = self._check_entry(name, info, data_size)

    def _check_entry(self, name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...],
                                                                         int, int]:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise ConvertError(f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise ConvertError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]
                <= data_size):
            raise ConvertError(f"{where}: data_offsets {offsets!r} do not lie inside the "
                               f"{data_size} bytes of tensor data")
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2,
                    "I8": 1, "U8": 1, "BOOL": 1}.get(dtype)
        if itemsize is None:
            raise ConvertError(f"{where}: unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ConvertError(f"{where}: {offsets[1] - offsets[0]} bytes of data, expected "
                               f"{nbytes} for {dtype} {shape}")
        return dtype, tuple(shape), offsets[0], nbytes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> str:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array, converted in chunks (no full-size temporary)."""
        dtype, shape, offset, _ = self.tensors[name]
        np_dtype = _ST_DTYPES.get(dtype)
        if np_dtype is None:
            raise ConvertError(f"{self.path}: tensor '{name}' has dtype {dtype}, expected a "
                               f"float type ({', '.join(_ST_DTYPES)})")
        n = math.prod(shape)
        out = np.empty(n, dtype=np.float32)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + offset)
            if dtype == "F32":
                self._read_into(f, out, name)
            else:
                buf = np.empty(min(n, _CHUNK), dtype=np_dtype)
                for start in range(0, n, _CHUNK):
                    part = buf[:min(_CHUNK, n - start)]
                    self._read_into(f, part, name)
                    out[start:start + part.size] = bf16_to_f32(part) if dtype == "BF16" else part
        return out.reshape(shape)

    def _read_into(self, f: Any, arr: np.ndarray, name: str) -> None:
        got = f.readinto(memoryview(arr).cast("B"))
        if got != arr.nbytes:
            raise ConvertError(f"{self.path}: tensor '{name}' is truncated (read {got} of "
                               f"{arr.nbytes} bytes)")


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path}: reading PyTorch pickles needs torch; install it with "
                           "pip install 'alpaca-cpu[convert]' (safetensors inputs do not)") from None
    return torch


class PickleFile:
    """A `.pth`/`.bin` state dict, loaded as weights only (code-carrying pickles are refused).

    Zip-format files (what torch.save writes) are memory-mapped: a tensor is read when it is
    converted, and its pages are released afterwards, so the whole checkpoint never counts as
    resident. Legacy (non-zip) pickles are loaded whole.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mapped = zipfile.is_zipfile(path)
        self.tensors = _load_pickle(path, self.mapped)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> str:
        return str(self.tensors[name].dtype).removeprefix("torch.")

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array."""
        import torch

        t = self.tensors[name].detach()
        if not t.dtype.is_floating_point:
            raise ConvertError(f"{self.path}: tensor '{name}' has dtype {t.dtype}, expected a "
                               "float type")
        out = t.to(torch.float32).contiguous()
        arr = out.numpy().copy() if out.data_ptr() == t.data_ptr() else out.numpy()
        if self.mapped:  # never on loaded memory: releasing it would zero shared storage
            _drop_pages(t.data_ptr(), t.numel() * t.element_size())
        return arr


def _load_pickle(path: Path, mapped: bool) -> dict[str, torch.Tensor]:
    torch = _import_torch(path)
    import pickle

    try:
        with warnings.catch_warnings():
            # Old-style pickles trigger a protocol notice; the load itself stays weights-only.
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        reason = next((ln for ln in lines if "GLOBAL" in ln),
                      next((ln for ln in lines if "Unsupported" in ln), lines[0]))
        reason = reason.removeprefix("WeightsUnpickler error: ")
        raise ConvertError(f"{path}: refused to load: the pickle wants to run code or build "
                           f"objects that are not tensors ({reason}). Only plain tensors are "
                           "accepted (torch.load weights_only=True).") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; all mean "bad file"
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint "
                           f"({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConvertError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a "
                               "tensor (a plain state dict)")
    return obj


def _drop_pages(address: int, nbytes: int) -> None:
    """Tell the kernel we are done with a memory-mapped range (read-only checkpoint pages), so
    they stop counting as resident; reading them again would simply fault them back in."""
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):  # not a POSIX libc: skip the optimisation
            _madvise = False
    if not _madvise:
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page  # only whole pages inside the range
    end = (address + nbytes) // page * page
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)  # an error (not a mapping) is harmless


_madvise: Any = None
_MADV_DONTNEED = 4
