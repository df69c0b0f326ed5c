"""Stale build locks of torch C++ extensions (the ops DeepSpeed JIT-compiles).

``torch.utils.cpp_extension`` guards each build with an empty file ``BUILD_DIR/lock`` (a
``FileBaton``); every other process that loads the same op polls until that file is gone, with no
time limit and no message. A build that is killed leaves the file behind, and from then on every
run that loads the op waits forever (in the test suite: until each test's timeout).

The suite builds no DeepSpeed op (``"torch_adam": true``, the shared-memory op skipped), so a
stale lock should not matter to it; ``tests/conftest.py`` still stops the session at start when
it finds one, with the command that clears it, because a config that does load an op would
otherwise hang for minutes per test instead of failing in a second.

A lock is stale when no process is building in its directory (no live process has its working
directory there: torch runs ninja and the compilers in the build directory) and nothing in the
directory has changed for ``grace_s`` seconds (the short Python-side setup before ninja starts).
Without ``/proc`` (not Linux) only the second rule applies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["extensions_root", "find_stale_locks", "stale_lock_message"]

GRACE_S = 60.0


def extensions_root() -> Path:
    """Where torch builds extensions: ``$TORCH_EXTENSIONS_DIR``, else its per-user cache
    (``~/.cache/torch_extensions``, which holds one ``py3X_<device>`` folder per Python/device)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions"


def _working_dirs() -> list[Path]:
    """Working directories of the live processes this user may inspect (Linux ``/proc``)."""
    cwds = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwds.append(Path(os.readlink(entry / "cwd")))
        except OSError:  # exited meanwhile, or another user's process
            continue
    return cwds


def _newest_change(directory: Path) -> float:
    """The latest mtime of ``directory`` and anything in it (a build writes object files)."""
    newest = directory.stat().st_mtime
    for path in directory.rglob("*"):
        try:
            newest = max(newest, path.lstat().st_mtime)
        except OSError:
            continue
    return newest


def find_stale_locks(root: Path, *, grace_s: float = GRACE_S, now: float | None = None,
                     working_dirs: list[Path] | None = None) -> list[Path]:
    """Lock files under ``root`` (``root/NAME/lock`` or ``root/py3X_DEVICE/NAME/lock``) that no
    build holds: no process works in that directory and it has not changed for ``grace_s``."""
    locks = sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})
    if not locks:
        return []
    now = time.time() if now is None else now
    busy = [d.resolve() for d in (_working_dirs() if working_dirs is None else working_dirs)]
    stale = []
    for lock in locks:
        build_dir = lock.parent.resolve()
        if any(d == build_dir or build_dir in d.parents for d in busy):
            continue
        try:
            if now - _newest_change(lock.parent) > grace_s:
                stale.append(lock)
        except FileNotFoundError:  # released meanwhile
            continue
    return stale


def stale_lock_message(locks: list[Path]) -> str:
    """What the user reads: which locks, why the run stops, and the command that clears them."""
    paths = " ".join(str(lock) for lock in locks)
    return (f"stale torch extension build lock(s): {paths}\n"
            "A C++ op build (DeepSpeed's, through torch.utils.cpp_extension) was killed and left "
            "its lock:\nno process is building there and nothing there changed in the last "
            f"{GRACE_S:.0f} s, but any run that\nloads that op would wait on the lock forever. "
            f"Remove it and run again:\n    rm {paths}\n"
            "(The next run that needs the op rebuilds it; the test suite itself builds none.)")


if __name__ == "__main__":  # python -m tests.build_locks: list stale locks, exit 1 if any
    import sys

    found = find_stale_locks(extensions_root())
    print(stale_lock_message(found) if found else f"no stale locks under {extensions_root()}")
    sys.exit(1 if found else 0)
