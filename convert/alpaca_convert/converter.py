"""One conversion: open the input, plan the output, write it (or describe it, for --dry-run)."""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_VERSION

from alpaca_cpu import _core
from alpaca_cpu.ggml_types import QK_K
from alpaca_cpu.self_calibration import DEFAULT_CHUNKS, DEFAULT_SEED
from alpaca_cpu.system import physical_cores

from . import metadata as kv
from .detect import open_source
from .errors import ConvertError
from .lora import LoraAdapter
from .quant_plan import MIXES, PlannedTensor, block_size, plan, quantizable, quantizer_missing
from .quantizer_names import DEFAULT_QUANTIZER, QUANTIZERS
from .source import Source
from .writer import check_output, write_gguf

if TYPE_CHECKING:
    from alpaca_cpu.imatrix import Imatrix


@dataclass(frozen=True)
class Summary:
    output: Path | None  # None for a dry run
    n_params: int
    tensor_bytes: int
    file_bytes: int  # 0 for a dry run
    seconds: float
    types: dict[str, int]  # GGML type name -> tensor count

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_params



def uses_search(qtype: T, quantizer: str) -> bool:
    """Whether a tensor of this type gets the error-minimising quantizer (the others, Q2_K and
    IQ4_NL, always get the reference one; Q3_K..Q6_K differ from it only with an imatrix)."""
    return quantizer == "search" and _core.has_search_quantizer(int(qtype))


def encode(w: np.ndarray, qtype: T, n_threads: int, quantizer: str = "reference",
           importance: np.ndarray | None = None) -> np.ndarray:
    """float32 weights -> GGML bytes (rows, row_bytes), with the engine's own quantizers:
    GGML's reference ones, or (quantizer "search", for the types that have one) the
    error-minimising search, weighting column c's squared error by importance[c]."""
    if w.ndim == 1:
        return np.ascontiguousarray(w, dtype=np.float32).view(np.uint8)
    x = np.ascontiguousarray(w, dtype=np.float32)
    if uses_search(qtype, quantizer):
        return _core.quantize(x, int(qtype), n_threads, method="search", importance=importance)
    return _core.quantize(x, int(qtype), n_threads)


def column_weights(importance: np.ndarray) -> np.ndarray:
    """An imatrix row (mean squared input per column) -> the quantizer's column weights:
    scaled to mean 1, with a floor (IMPORTANCE_FLOOR of the mean) so that a column the
    calibration text never exercised still counts a little."""
    mean = float(importance.mean())
    if not mean > 0:
        return np.ones_like(importance, dtype=np.float32)
    return (importance / mean + IMPORTANCE_FLOOR).astype(np.float32)


# A column's weight is at least this fraction of the mean: the calibration text is a sample,
# and a column it left silent may not be silent on other text.
IMPORTANCE_FLOOR = 0.01


def check_finite(w: np.ndarray, name: str, path: object) -> None:
    """ConvertError naming the tensor and the first non-finite value's position."""
    if np.isfinite(w).all():
        return
    bad = np.argwhere(~np.isfinite(w))[0]
    where = ", ".join(str(int(i)) for i in bad)
    raise ConvertError(f"{path}: tensor {name} has a non-finite value ({w[tuple(bad)]}) at "
                       f"[{where}]; refusing to quantize it")


def _producer(source: Source, lora: LoraAdapter | None, n_threads: int, quantizer: str,
              imatrix: Imatrix | None) -> Callable[[PlannedTensor], np.ndarray]:
    """The function the writer calls for each tensor's bytes: read, merge, quantize."""

    def produce(t: PlannedTensor) -> np.ndarray:
        touched = lora is not None and lora.touches(t.name)
        raw = None if touched else source.raw(t.name)
        if raw is not None and raw[0] == t.type:
            return raw[1]  # already in the wanted type: copy it, like llama-quantize
        w = source.read(t.name)
        if tuple(w.shape) != t.shape:
            raise ConvertError(f"{source.path}: tensor {t.name} read as {list(w.shape)}, "
                               f"expected {list(t.shape)}")
        if lora is not None:
            w = lora.apply(t.name, w)
        if t.type not in (T.F32, T.F16):
            check_finite(w, t.name, source.path)
        imp = imatrix.importance(t.name) if imatrix is not None else None
        if imp is not None and (w.ndim != 2 or imp.shape[0] != w.shape[1]):
            raise ConvertError(f"imatrix entry {t.name} has {imp.shape[0]} columns, the tensor "
                               f"{list(w.shape)}")
        weights = column_weights(imp) if imp is not None and uses_search(t.type, quantizer) \
            else None
        return encode(w, t.type, n_threads, quantizer, weights)

    return produce


def _missing_quantizers(tensors: list[PlannedTensor], outtype: str) -> str:
    """Why this build cannot write the plan ('' if it can): the types its engine's type table
    lacks, so a build that gains them needs no change here."""
    missing = quantizer_missing(tensors)
    if not missing:
        return ""
    names = ", ".join(t.name for t in missing)
    have = ", ".join(t.name for t in sorted(quantizable()))
    return (f"--outtype {outtype}: {'types' if len(missing) > 1 else 'type'} {names} "
            f"{'are' if len(missing) > 1 else 'is'} not supported by this build's quantizers "
            f"(it has {have})")


# The self-generated importance matrix of --self-imatrix (alpaca_cpu/self_calibration.py).
SELF_CHUNKS, SELF_CTX, SELF_SEED = DEFAULT_CHUNKS, 512, DEFAULT_SEED


def _self_generated_imatrix(input_path: Path, lora: str | Path | None, output: Path,
                            n_threads: int, progress: bool, out: TextIO) -> Imatrix:
    """The importance matrix of the model over text it samples itself. A GGUF input runs in
    the engine as it is; a checkpoint folder (or a LoRA merge) is first written as a temporary
    F16 GGUF beside the output, removed afterwards."""
    from alpaca_cpu.cli.imatrix import self_generated_imatrix

    def from_file(model: Path) -> Imatrix:
        print(f"imatrix:   sampling {SELF_CHUNKS} chunks of {SELF_CTX} tokens from {model.name} "
              "and collecting their activations", file=out)
        try:
            return self_generated_imatrix(model, SELF_CHUNKS, SELF_CTX, SELF_SEED, n_threads,
                                          progress)
        except (ValueError, OSError) as e:
            raise ConvertError(f"--self-imatrix: {e}") from None

    if input_path.is_file() and lora is None:
        return from_file(input_path)
    with tempfile.TemporaryDirectory(prefix=".self-imatrix-", dir=output.parent) as tmp:
        f16 = Path(tmp) / "calibration-model.f16.gguf"
        convert(input_path, f16, outtype="f16", lora=lora, n_threads=n_threads,
                progress=progress, out=out)
        return from_file(f16)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _method(t: PlannedTensor, quantizer: str, imatrix: Imatrix | None,
            self_imatrix: bool = False) -> str:
    """How a tensor will be made, for --dry-run: copy, reference, search or search+imatrix."""
    if t.type in (T.F32, T.F16):
        return "convert"
    if not uses_search(t.type, quantizer):
        return "reference"
    if imatrix is not None and imatrix.importance(t.name) is not None:
        return "search+imatrix"
    if self_imatrix and t.name.startswith("blk."):  # an imatrix has every layer matrix
        return "search+imatrix"
    return "reference" if block_size(t.type) == QK_K else "search"  # K-quants need importance


def _print_plan(source: Source, lora: LoraAdapter | None, tensors: list[PlannedTensor],
                outtype: str, output: Path | None, out: TextIO, quantizer: str,
                imatrix: Imatrix | None, imatrix_path: Path | None,
                self_imatrix: bool = False) -> None:
    p = source.params
    print(f"input:     {source.describe()}", file=out)
    if lora is not None:
        print(f"lora:      {lora.describe()}", file=out)
    if source.tokenizer_description:
        print(f"tokenizer: {source.tokenizer_description}", file=out)
    print(f"model:     {p.n_layers} layers, dim {p.dim}, {p.n_heads} heads ({p.n_kv_heads} kv), "
          f"head size {p.head_dim}, ffn {p.ffn_dim}, vocab {p.n_vocab}, "
          f"{'tied' if p.tied_embeddings else 'untied'} embeddings, rope base {p.rope_base:g}",
          file=out)
    print(f"output:    {output if output else '(none)'} as {outtype} "
          f"({MIXES[outtype].file_type.name}), "
          f"{len(tensors)} tensors, {_human(sum(t.nbytes for t in tensors))} of weights", file=out)
    print(f"quantizer: {quantizer} ("
          f"{'error-minimising scales' if quantizer == 'search' else 'GGML reference, bit-exact'}"
          f" for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; Q3_K-Q6_K: importance-weighted fits with an "
          f"imatrix, else reference; Q2_K, IQ4_NL: reference)", file=out)
    if imatrix is not None:
        print(f"imatrix:   {imatrix_path}: {len(imatrix)} matrices, {imatrix.chunk_count} chunks "
              f"of {imatrix.chunk_size} tokens ({', '.join(imatrix.datasets) or 'no dataset'})",
              file=out)
    if self_imatrix:
        print(f"imatrix:   self-generated before quantizing: {SELF_CHUNKS} chunks of "
              f"{SELF_CTX} tokens the model samples itself (seed {SELF_SEED})", file=out)
    for t in tensors:
        print(f"  {t.name:<28} {'x'.join(map(str, t.shape)):>14}  "
              f"{source.stored_type(t.name):>8} -> {t.type.name:<6} {_human(t.nbytes):>10}  "
              f"{_method(t, quantizer, imatrix, self_imatrix)}", file=out)


def convert(input_path: str | Path, output: str | Path | None, outtype: str = "q4_0",
            lora: str | Path | None = None, force: bool = False, dry_run: bool = False,
            n_threads: int | None = None, progress: bool = False,
            out: TextIO | None = None, quantizer: str = DEFAULT_QUANTIZER,
            imatrix: str | Path | None = None, self_imatrix: bool = False) -> Summary:
    """Convert a Meta / Hugging Face checkpoint folder or a GGUF file to a GGUF file.

    The plan (--dry-run) and the summary are printed to `out` (default: stdout), the progress
    bar to stderr. quantizer: "search" (error-minimising scales) or "reference" (GGML's,
    bit-exact); imatrix: an importance-matrix file (llama.cpp's format) weighting the search;
    self_imatrix: make one first from text the model samples itself (no calibration data).
    """
    start = time.monotonic()
    out = out if out is not None else sys.stdout
    if outtype not in MIXES:
        raise ConvertError(f"--outtype {outtype!r}, expected one of {', '.join(MIXES)}")
    if output is None and not dry_run:
        raise ConvertError("no output file given (-o OUTPUT.gguf)")
    output = Path(output) if output is not None else None
    if output is not None:
        check_output(output, force)
    n_threads = n_threads or physical_cores()
    if quantizer not in QUANTIZERS:
        raise ConvertError(f"--quantizer {quantizer!r}, expected one of {', '.join(QUANTIZERS)}")
    im = None
    imatrix_path = Path(imatrix) if imatrix is not None else None
    if self_imatrix and imatrix_path is not None:
        raise ConvertError("--self-imatrix and --imatrix both given: use one importance matrix")
    if self_imatrix and quantizer != "search":
        raise ConvertError("--self-imatrix needs --quantizer search (the reference quantizers "
                           "take no importance)")
    if imatrix_path is not None:
        if quantizer != "search":
            raise ConvertError("--imatrix needs --quantizer search (the reference quantizers "
                               "take no importance)")
        from alpaca_cpu.imatrix import ImatrixError, read_imatrix
        try:
            im = read_imatrix(imatrix_path)
        except ImatrixError as e:
            raise ConvertError(str(e)) from None

    source = open_source(input_path)
    adapter = LoraAdapter(Path(lora), source.params) if lora is not None else None
    tensors = plan(source.params, outtype)
    missing = _missing_quantizers(tensors, outtype)
    entries = source.metadata() + [
        kv.u32("general.file_type", int(MIXES[outtype].file_type)),
        kv.u32("general.quantization_version", GGML_QUANT_VERSION),
    ]
    if im is not None and imatrix_path is not None:  # the keys llama-quantize writes
        entries += [kv.string("quantize.imatrix.file", imatrix_path.name),
                    kv.i32("quantize.imatrix.entries_count", len(im)),
                    kv.i32("quantize.imatrix.chunks_count", im.chunk_count)]
        if im.datasets:
            entries.append(kv.string("quantize.imatrix.dataset", im.datasets[-1]))
    n_params = sum(t.n_elements for t in tensors)
    tensor_bytes = sum(t.nbytes for t in tensors)
    types = dict(Counter(t.type.name for t in tensors))
    if dry_run:
        _print_plan(source, adapter, tensors, outtype, output, out, quantizer, im, imatrix_path,
                    self_imatrix)
        if missing:
            print(f"note: {missing}; writing this file would fail", file=out)
        print("dry run: inputs checked, nothing written", file=out)
        return Summary(None, n_params, tensor_bytes, 0, time.monotonic() - start, types)
    assert output is not None
    if missing:
        raise ConvertError(missing)
    if self_imatrix:
        im = _self_generated_imatrix(Path(input_path), lora, output, n_threads, progress, out)
        entries += [kv.string("quantize.imatrix.file", "(self-generated)"),
                    kv.i32("quantize.imatrix.entries_count", len(im)),
                    kv.i32("quantize.imatrix.chunks_count", im.chunk_count),
                    kv.string("quantize.imatrix.dataset", im.datasets[-1])]
    file_bytes = write_gguf(output, entries, tensors, _producer(source, adapter, n_threads, quantizer, im),
                            force=force, progress=progress)
    summary = Summary(output, n_params, tensor_bytes, file_bytes, time.monotonic() - start, types)
    print(f"wrote {output}: {n_params / 1e6:.2f} M parameters, {_human(file_bytes)}, "
          f"{summary.bits_per_weight:.2f} bits per weight, "
          f"{', '.join(f'{n} {k}' for k, n in sorted(types.items()))} tensors, "
          f"{summary.seconds:.1f} s", file=out)
    return summary
