"""Which kernel tables the import picks: agreement with the CPU flags Linux reports, and the
AVX-512 tables never chosen (nor forceable) on a CPU without AVX-512, shown by running the real
extension under qemu-x86_64 on a Zen 3 CPU model (AVX2, no AVX-512)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool
from test_kernels import GEMM_RTOL

import alpaca_cpu

X86 = platform.machine().lower() in ("x86_64", "amd64")
INSTALL_SCRIPT = ".ci/install-cross.sh"


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not X86 or not os.path.exists("/proc/cpuinfo"),
                    reason="the x86 tables exist on x86-64 Linux only")
def test_x86_tables_follow_the_cpu_flags() -> None:
    # Linux lists a feature only when the OS saves its registers (XCR0), as dispatch.cpp checks.
    flags = _cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl"} <= flags
    expected = ["scalar"] + ["avx2"] * avx2 + ["avx512"] * avx512
    expected += ["avx512_vnni"] * (avx512 and "avx512_vnni" in flags)
    assert alpaca_cpu.available_isas() == expected
    # the default is the best of them
    probe = subprocess.run([sys.executable, "-c", "import alpaca_cpu; print(alpaca_cpu.active_isa())"],
                           capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "ALPACA_CPU_ISA"})
    assert probe.stdout.strip() == expected[-1]


# A CPU model of qemu 7.2 with AVX2, FMA and F16C but no AVX-512 (AMD Zen 3).
ZEN3 = "EPYC-Milan"
PROBE = """
import alpaca_cpu, numpy as np
from gguf import GGMLQuantizationType as T
from alpaca_cpu import _core, quants as q
print("isas", ",".join(alpaca_cpu.available_isas()))
print("active", alpaca_cpu.active_isa())
rng = np.random.default_rng(0)
w = q.quantize(rng.standard_normal((24, 256)).astype(np.float32), T.Q4_0)
act = q.quantize(rng.standard_normal((5, 256)).astype(np.float32), T.Q8_0)
got = _core.gemm(int(T.Q4_0), w, act, 256, alpaca_cpu.active_isa())
ref = _core.gemm(int(T.Q4_0), w, act, 256, "scalar")
print("gemm_max_rel_diff", float(np.abs(got - ref).max() / np.abs(ref).max()))
# what `ALPACA_CPU_ISA=avx512_vnni python -c "import alpaca_cpu"` runs at import
import os
from alpaca_cpu import isa
os.environ[isa.ENV_VAR] = "avx512_vnni"
try:
    isa.select_from_environment()
    print("forced no error")
except ImportError as e:
    print("forced", e)
"""


@pytest.mark.slow
def test_no_avx512_table_on_a_cpu_without_it() -> None:
    if not X86:
        pytest.skip("qemu-x86_64 runs the x86-64 build; this host is not x86-64")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        require_tool("qemu-x86_64", f"install it with `bash {INSTALL_SCRIPT}` (Debian/Ubuntu: "
                                    "apt-get install qemu-user)")
    # The venv's own interpreter path (not the resolved binary), so its site-packages are used.
    python = str(Path(sys.prefix) / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "ALPACA_CPU_ISA"}
    run = subprocess.run([qemu, "-cpu", ZEN3, python, "-c", PROBE], capture_output=True, check=False,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert lines["isas"] == "scalar,avx2" and lines["active"] == "avx2", run.stdout
    # the AVX2 Q4_0 panels run there and agree with the scalar table (test_kernels' tolerance)
    assert float(lines["gemm_max_rel_diff"]) <= GEMM_RTOL, run.stdout
    assert lines["forced"] == ("ALPACA_CPU_ISA='avx512_vnni': ISA 'avx512_vnni' is not available "
                               "on this CPU/build (available: scalar, avx2)"), run.stdout
