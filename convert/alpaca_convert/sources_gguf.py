"""An existing GGUF model file as input, for re-quantization to another type.

The file is validated by the engine's own loader first; metadata is copied with its on-disk
types, except the keys that describe the tensor types, which the converter rewrites.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from alpaca_cpu import _core
from alpaca_cpu.errors import ModelFileError
from alpaca_cpu.gguf_file import open_model_file

from .errors import ConvertError
from .hparams import tensor_shapes
from .metadata import KeyValue
from .source import Source

# Rewritten by the converter (general.architecture is written by GGUFWriter itself).
_REWRITTEN = {"general.architecture", "general.file_type", "general.quantization_version"}


class GgufSource(Source):
    kind = "GGUF"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.model_file = open_model_file(path)
        except ModelFileError as e:
            raise ConvertError(str(e)) from None
        self.params = self.model_file.config
        self._shapes = tensor_shapes(self.params)

    def raw(self, name: str) -> tuple[T, np.ndarray]:
        t = self.model_file.tensors[name]
        return t.type, t.data.reshape(t.rows, -1)

    def read(self, name: str) -> np.ndarray:
        t = self.model_file.tensors[name]
        if t.type == T.F32:
            w = t.data.view(np.float32).reshape(t.rows, t.cols)
        else:
            w = _core.dequantize(t.data.reshape(t.rows, -1), int(t.type), t.cols)
        return w.reshape(self._shapes[name])

    def stored_type(self, name: str) -> str:
        return self.model_file.tensors[name].type.name

    def metadata(self) -> list[KeyValue]:
        # What the engine's reader parsed at open (gguf.GGUFReader would parse the file again,
        # 3.8 s for SmolLM2's 49k-token vocabulary).
        mf = self.model_file
        entries = []
        for key, value in mf.metadata.items():
            if key in _REWRITTEN:
                continue
            kind = mf.value_types[key]
            if kind == V.ARRAY:
                if mf.array_types[key] == V.ARRAY:
                    raise ConvertError(f"{self.path}: metadata key '{key}' is a nested array, "
                                       "which cannot be copied")
                entries.append(KeyValue(key, value, kind, mf.array_types[key]))
            else:
                entries.append(KeyValue(key, value, kind))
        return entries

    def describe(self) -> str:
        return f"GGUF file {self.path}"
