"""A killed C++ extension build leaves a lock that torch waits on forever; the suite reports it
at start instead (tests/build_locks.py, tests/conftest.py).

Every lock here is planted in a temporary TORCH_EXTENSIONS_DIR; the real cache is not touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.build_locks import find_stale_locks

REPO = Path(__file__).resolve().parent.parent


def _plant(root: Path, name: str, *, age_s: float, layout: str = "py311_cpu") -> Path:
    """A build directory with an object file and a lock, all last changed ``age_s`` ago."""
    build = root / layout / name if layout else root / name
    build.mkdir(parents=True)
    (build / f"{name}.o").write_bytes(b"\0")
    lock = build / "lock"
    lock.touch()
    then = time.time() - age_s
    for path in (build / f"{name}.o", lock, build):
        os.utime(path, (then, then))
    return lock


def test_stale_lock_is_found_and_live_builds_are_not(tmp_path: Path) -> None:
    killed = _plant(tmp_path, "fused_adam", age_s=600)
    _plant(tmp_path, "cpu_adam", age_s=1)  # just taken: torch is writing build.ninja
    assert find_stale_locks(tmp_path) == [killed]
    assert find_stale_locks(tmp_path, working_dirs=[killed.parent / "sub"]) == []
    # A build in progress: a live process (ninja, the compiler) works in the build directory.
    build = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             cwd=killed.parent)
    try:
        assert find_stale_locks(tmp_path) == []
    finally:
        build.kill()
        build.wait()
    assert find_stale_locks(tmp_path) == [killed]
    # TORCH_EXTENSIONS_DIR set: torch builds in ROOT/NAME, without the py3X_device level.
    flat = _plant(tmp_path / "flat", "deepspeed_shm_comm", age_s=600, layout="")
    assert find_stale_locks(tmp_path / "flat") == [flat]


def test_torch_itself_waits_on_the_lock() -> None:
    """Why the check exists: torch's FileBaton polls until the lock is gone, with no limit."""
    import tempfile

    from torch.utils.file_baton import FileBaton

    with tempfile.TemporaryDirectory() as tmp:
        lock = _plant(Path(tmp), "fused_adam", age_s=600)
        waiter = threading.Thread(target=FileBaton(str(lock)).wait, daemon=True)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive(), "torch no longer waits on a leftover lock"
        lock.unlink()
        waiter.join(5.0)
        assert not waiter.is_alive()


def test_the_suite_stops_at_start_on_a_stale_lock(tmp_path: Path) -> None:
    """pytest with a stale lock in TORCH_EXTENSIONS_DIR exits at once, naming the lock and the
    command that clears it; without the lock the same run passes."""
    ext = tmp_path / "torch_extensions"
    lock = _plant(ext, "fused_adam", age_s=600, layout="")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    target = f"{Path(__file__).relative_to(REPO)}::test_stale_lock_is_found_and_live_builds_are_not"

    def pytest_run() -> tuple[subprocess.CompletedProcess, float]:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               target], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        return proc, time.monotonic() - start

    proc, seconds = pytest_run()
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "stale torch extension build lock" in out, out
    assert f"rm {lock}" in out and "1 passed" not in out, out
    assert seconds < 60, f"took {seconds:.0f} s"
    lock.unlink()
    proc, _ = pytest_run()
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
