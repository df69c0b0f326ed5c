"""Session-wide checks of the test suite.

A stale torch-extension build lock (a DeepSpeed op build that was killed) would make any test
that loads that op wait until its timeout; the session stops at start instead (exit status 4),
naming the lock and the command that removes it (tests/build_locks.py).
"""

from __future__ import annotations

import pytest

from tests.build_locks import extensions_root, find_stale_locks, stale_lock_message


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = find_stale_locks(extensions_root())
    if stale:
        raise pytest.UsageError(stale_lock_message(stale))
