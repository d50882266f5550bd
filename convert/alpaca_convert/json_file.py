"""The JSON files of a checkpoint folder (config.json, params.json, indexes, tokenizer and
adapter configs): each must hold one object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConvertError


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a ConvertError naming the file when it is unreadable, not
    JSON, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data
