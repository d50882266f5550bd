"""Writing a GGUF file tensor by tensor, atomically.

The header, metadata and tensor table are written first (sizes are known from the plan), then
each tensor is produced, written and dropped, so memory holds one tensor at a time. Everything
goes to a hidden temporary file in the output's folder, which is fsync'ed and renamed into place
only when complete: an error or Ctrl-C leaves no partial file at the output path, and an existing
file is replaced only with force=True.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V
from gguf import GGUFWriter
from tqdm import tqdm

from .errors import ConvertError
from .metadata import KeyValue
from .quant_plan import PlannedTensor


def check_output(path: Path, force: bool) -> None:
    """Refuse early what the final rename would refuse."""
    if path.is_dir():
        raise ConvertError(f"{path}: is a folder, expected an output file name")
    if not path.parent.is_dir():
        raise ConvertError(f"{path}: the folder {path.parent} does not exist")
    if path.exists() and not force:
        raise ConvertError(f"{path}: already exists; use --force to overwrite it")


def _publish(tmp: Path, path: Path, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the output appeared meanwhile: never clobber it
    except FileExistsError:
        raise ConvertError(f"{path}: already exists; use --force to overwrite it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise ConvertError(f"{path}: already exists; use --force to overwrite it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_gguf(path: Path, entries: list[KeyValue], tensors: list[PlannedTensor],
               produce: Callable[[PlannedTensor], np.ndarray], force: bool = False,
               progress: bool = True) -> int:
    """Write a GGUF v3 `llama` file; `produce` returns each tensor's GGML bytes (rows, row_bytes).

    Returns the size of the file written.
    """
    check_output(path, force)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = GGUFWriter(None, "llama")
    try:
        for e in entries:
            if e.type == V.ARRAY and not e.value:
                continue  # gguf-py cannot write empty arrays; an absent key means the same
            writer.add_key_value(e.key, e.value, e.type, e.sub_type)
        for t in tensors:
            row_bytes = t.nbytes // (t.shape[0] if len(t.shape) == 2 else 1)
            byte_shape = (t.shape[0], row_bytes) if len(t.shape) == 2 else (row_bytes,)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes,
                                   raw_dtype=t.type)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in tensors)
        tty = sys.stderr.isatty()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                  disable=not progress, dynamic_ncols=True, leave=False) as bar:
            for t in tensors:
                # On a terminal, name the tensor being made now; in a log, only at tqdm's pace.
                bar.set_description_str(t.name, refresh=tty)
                data = produce(t)
                if data.dtype != np.uint8 or data.nbytes != t.nbytes:
                    raise RuntimeError(f"{t.name}: produced {data.nbytes} bytes of {data.dtype}, "
                                       f"planned {t.nbytes} bytes of {t.type.name}")
                writer.write_tensor_data(data)
                bar.update(t.nbytes)
                del data
        writer.flush()
        assert writer.fout is not None
        os.fsync(writer.fout[0].fileno())
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        _publish(tmp, path, force)
        _fsync_dir(path.parent)
    except BaseException:  # includes KeyboardInterrupt: never leave the partial file behind
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size
