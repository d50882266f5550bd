"""convert-weights killed with SIGKILL half-way (no cleanup code can run) loses nothing.

The converter writes into a hidden temporary file next to the output (`.NAME.XXXX.part`,
alpaca_convert/writer.py) and renames it into place only once it is complete and fsync'ed. So
after a kill at any point the output path holds the file that was there before (replaced with
--force), byte for byte, or nothing if there was none, or (a kill after the rename) the complete
new file: never a partial one. Nothing but hidden temporary files is left in the folder, and
the next conversion succeeds.

Kill points: deterministic ones, where a hook in the child process stops the writer (after the
header only, after a random number of tensors, and with the file complete but not yet renamed)
and tells the test so; and real kills of the unmodified command at random moments after its
temporary file appears (these may also come after the rename, or find it finished: the output
path must then hold a complete file), plus one as soon as it appears, so that at least one real
kill lands while the command writes however fast the machine is (the test checks that one did).
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hf_tiny import TinyConfig, save_hf, tiny_llama, train_spm

from alpaca_cpu.gguf_file import open_model_file

# 28 M parameters (110 MB of F32): the command writes for a moment after its temporary file
# appears (a fraction of a second), so random kills mostly land while it writes.
MODEL = TinyConfig(dim=512, n_layers=8, ffn_dim=1536)
N_TENSORS = 2 + 9 * MODEL.n_layers + 1  # token_embd, output_norm, 9 per layer, output
N_RANDOM_KILLS = 4
MAX_KILL_DELAY_S = 0.15  # random kills come within this long after the temporary file appears
SEED = 20240607
HANG_GUARD_S = 120.0  # only so that a stuck child fails the test instead of hanging it

# The child for the deterministic kill points: the real command line, with the writer stopped
# at a chosen point (argv[2]: "publish", or the number of tensors written before it stops).
DRIVER = """
import sys, time
from pathlib import Path
import alpaca_convert.writer as writer
from alpaca_convert.cli import main

marker, stop_at = Path(sys.argv[1]), sys.argv[2]

def wait_to_be_killed():
    marker.touch()
    time.sleep(3600)

if stop_at == "publish":  # the temporary file is complete, fsync'ed, not yet renamed
    writer._publish = lambda tmp, path, force: wait_to_be_killed()
else:
    write_tensor_data = writer.GGUFWriter.write_tensor_data
    written = [0]
    def stopping_write(self, *args, **kwargs):
        if written[0] == int(stop_at):
            self.flush()  # what is written so far is in the file, as after a crash
            wait_to_be_killed()
        write_tensor_data(self, *args, **kwargs)
        written[0] += 1
    writer.GGUFWriter.write_tensor_data = stopping_write
sys.exit(main(sys.argv[3:]))
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(hf_dir: Path, out: Path, force: bool, outtype: str = "q8_0") -> list[str]:
    # The reference quantizer: what is written is beside the point here, and the default
    # error-minimising search is several times slower.
    return [str(hf_dir), "-o", str(out), "--outtype", outtype, "--quantizer", "reference", "-q",
            *(["--force"] * force)]


def temporary_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.part"))


def assert_nothing_lost(folder: Path, out: Path, previous_hash: str | None) -> bool:
    """After a kill: at the output path the previous file intact (or none), or a complete new
    one; beside it only hidden temporary files. True if the new file got there."""
    for p in folder.iterdir():  # hidden, next to the output, named after it
        assert p == out or re.fullmatch(rf"\.{re.escape(out.name)}\.[^/]+\.part", p.name), p
    if out.exists() and (previous_hash is None or sha256(out) != previous_hash):
        assert_complete(out)
        return True
    assert out.exists() == (previous_hash is not None)
    return False


def assert_complete(out: Path) -> None:
    mf = open_model_file(out)
    assert mf.config.n_layers == MODEL.n_layers and len(mf.tensors) == N_TENSORS


def wait_for(condition: Callable[[], object], child: subprocess.Popen[bytes]) -> None:
    """Poll `condition()` until it holds or the child exits."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition() and child.poll() is None:
        assert time.monotonic() < deadline, "the converter neither progressed nor finished"
        time.sleep(0.001)


def kill(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(HANG_GUARD_S)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hf")
    return save_hf(tiny_llama(MODEL), tmp / "model", spm_model=train_spm(tmp / "tok.model"))


@pytest.fixture(scope="module")
def previous(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete earlier conversion (another type), for the kills of --force runs."""
    out = tmp_path_factory.mktemp("previous") / "model.gguf"
    subprocess.run([sys.executable, "-m", "alpaca_convert", *command(hf_dir, out, False, "f16")],
                   check=True, timeout=HANG_GUARD_S)
    assert_complete(out)
    return out


def place(previous: Path, folder: Path, existing: bool) -> tuple[Path, str | None]:
    out = folder / "model.gguf"
    if existing:
        shutil.copyfile(previous, out)
        return out, sha256(out)
    return out, None


STOP_POINTS = ["0", str(random.Random(SEED).randrange(1, N_TENSORS)), "publish"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("stop_at", STOP_POINTS,
                         ids=["after-header", f"after-{STOP_POINTS[1]}-tensors", "before-rename"])
def test_kill_at_a_known_point(stop_at: str, existing: bool, hf_dir: Path, previous: Path,
                               tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    out, previous_hash = place(previous, folder, existing)
    marker = tmp_path / "stopped"
    child = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), stop_at,
                              *command(hf_dir, out, existing)])
    try:
        wait_for(marker.exists, child)
        assert child.poll() is None, "the converter ended before reaching the kill point"
    finally:
        kill(child)
    assert child.returncode == -signal.SIGKILL
    assert not assert_nothing_lost(folder, out, previous_hash)
    left = temporary_files(out)
    assert len(left) == 1  # it was killed mid-write
    if stop_at == "publish":  # the complete file was there, only not in place
        assert_complete(left[0])


def test_random_kills_of_the_real_command(hf_dir: Path, previous: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    folder = tmp_path / "out"
    folder.mkdir()
    # The first kill as soon as the temporary file appears; the others at random moments.
    delays = [0.0] + [rng.uniform(0, MAX_KILL_DELAY_S) for _ in range(N_RANDOM_KILLS)]
    mid_write = []  # per kill: did it stop the child while it wrote its temporary file?
    for i, delay in enumerate(delays):
        existing = i % 2 == 1
        out, previous_hash = place(previous, folder, existing)
        child = subprocess.Popen([sys.executable, "-m", "alpaca_convert",
                                  *command(hf_dir, out, existing)])
        before = set(temporary_files(out))
        try:
            wait_for(lambda: set(temporary_files(out)) - before, child)  # noqa: B023
            seen = bool(set(temporary_files(out)) - before)  # or the child ended first
            time.sleep(delay)
        finally:
            kill(child)
        # Killed, or finished first; either way, and even if the kill came after the rename,
        # the output path holds a whole file.
        assert child.returncode in (0, -signal.SIGKILL)
        arrived = assert_nothing_lost(folder, out, previous_hash)
        # Mid-write: its temporary file appeared before the kill, SIGKILL ended it, and the
        # file was left unpublished (the new output never reached the output path).
        mid_write.append(seen and child.returncode == -signal.SIGKILL and not arrived
                         and bool(set(temporary_files(out)) - before))
        out.unlink(missing_ok=True)
    # Otherwise the test would only have watched conversions finish or die after the rename.
    assert any(mid_write), f"no kill landed while the converter wrote: {mid_write}"
    # Leftovers from the kills do not get in the way of the next conversion.
    out = folder / "model.gguf"
    subprocess.run([sys.executable, "-m", "alpaca_convert", *command(hf_dir, out, False)],
                   check=True, timeout=HANG_GUARD_S)
    assert_complete(out)
