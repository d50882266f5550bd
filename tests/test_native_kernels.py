"""The native kernel driver (tests/native/test_kernels_native.cpp), outside Python.

Built with the host compiler it compares every kernel table this machine has with the scalar
one (x86-64: avx2). Cross-compiled for aarch64 and run under qemu-aarch64 on a CPU model with
and one without dotprod (tests/native/run_neon_qemu.sh), it tests both NEON tables, so the ARM
path is run, not just compiled. Without the cross tools that test is skipped (saying how to
install them); CI installs them with .ci/install-cross.sh and sets ALPACA_CPU_REQUIRE_ALL=1, under
which a missing tool fails it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import require_tool

import alpaca_cpu

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
DRIVER = REPO / "tests" / "native" / "test_kernels_native.cpp"
QEMU_SCRIPT = REPO / "tests" / "native" / "run_neon_qemu.sh"
INSTALL_SCRIPT = ".ci/install-cross.sh"

# The flags CMakeLists.txt gives every file, then per architecture: its definitions and each
# per-ISA file with its own flags (keep in step with CMakeLists.txt). -O1 instead of the
# build's -O3 halves the compile (30 -> 15 s on 2 cores): the -O3 kernels themselves are
# checked on every host ISA through the extension (test_kernels.py); this driver adds the
# C++-level checks.
COMMON_FLAGS = ["-std=c++17", "-O1", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter"]
ARCHES = {
    "x86_64": {
        "defines": ["-DALPACA_HAVE_X86=1"],
        "isa_glob": "kernels_avx*.cpp",
        "isa_files": {
            "kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
            "kernels_avx512.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                                   "-mavx512vl"],
            "kernels_avx512_vnni.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                                        "-mavx512vl", "-mavx512vnni"],
        },
    },
    "aarch64": {
        "defines": ["-DALPACA_HAVE_NEON=1"],
        "isa_glob": "kernels_neon*.cpp",
        "isa_files": {
            "kernels_neon.cpp": [],
            "kernels_neon_dotprod.cpp": ["-march=armv8.2-a+dotprod"],
        },
    },
}
PORTABLE_FILES = ["kernels_scalar.cpp", "dispatch.cpp", "ggml_types.cpp", "ggml_quants.cpp"]

SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _compile(cxx: str, src: Path, flags: list[str], obj: Path) -> str:
    """Compile one file; returns the compiler's complaint, or '' on success."""
    proc = subprocess.run(
        [cxx, *COMMON_FLAGS, *flags, f"-I{CSRC}", "-c", str(src), "-o", str(obj)],
        check=False,
        capture_output=True,
        text=True,
    )
    return "" if proc.returncode == 0 else f"{src.name}:\n{proc.stderr}"


def test_native_driver_on_host(tmp_path: Path) -> None:
    arch = _host_arch()
    if arch not in ARCHES:
        require_tool(f"a native kernel build for {arch}",
                     "this test builds the driver for x86_64 and aarch64 hosts only (ARCHES)")
    spec = ARCHES[arch]
    unlisted = sorted(
        p.name for p in CSRC.glob(spec["isa_glob"]) if p.name not in spec["isa_files"]
    )
    assert not unlisted, (
        f"{unlisted} have no entry in ARCHES[{arch!r}]['isa_files'] of {Path(__file__).name}: "
        "add them with their flags from CMakeLists.txt"
    )
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler on PATH (set CXX)"

    sources = [(CSRC / f, spec["defines"]) for f in PORTABLE_FILES]
    sources += [(CSRC / f, spec["defines"] + flags) for f, flags in spec["isa_files"].items()]
    sources.append((DRIVER, spec["defines"]))
    objs = [tmp_path / (src.stem + ".o") for src, _ in sources]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        errors = list(
            pool.map(lambda job, obj: _compile(cxx, job[0], job[1], obj), sources, objs)
        )
    assert not any(errors), "\n".join(e for e in errors if e)
    exe = tmp_path / "test_kernels_native"
    link = subprocess.run([cxx, *map(str, objs), "-o", str(exe)], check=False,
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr

    # The driver's runtime detection must agree with the extension's.
    expected = ",".join(alpaca_cpu.available_isas())
    run = subprocess.run(
        [str(exe), "--expect-isas", expected], check=False, capture_output=True, text=True,
        timeout=300,
    )
    summary = SUMMARY.findall(run.stdout)
    assert run.returncode == 0 and summary and summary[-1][1] == "0", run.stdout + run.stderr


@pytest.mark.slow
def test_neon_kernels_under_qemu() -> None:
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        require_tool(
            " and ".join(missing),
            f"the NEON kernels are tested under qemu-aarch64; install the tools with "
            f"`bash {INSTALL_SCRIPT}` (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu "
            f"qemu-user)",
        )
    run = subprocess.run(
        ["bash", str(QEMU_SCRIPT)], check=False, capture_output=True, text=True, timeout=600,
        cwd=REPO,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    # Two CPU models (with and without dotprod), each ending with a clean summary.
    summaries = SUMMARY.findall(run.stdout)
    assert len(summaries) == 2 and all(failed == "0" for _, failed in summaries), out
    assert "available ISAs: scalar,neon,neon_dotprod" in run.stdout, out
    assert "available ISAs: scalar,neon\n" in run.stdout, out
