"""The test suites' wait: poll a condition until it holds, failing the test (AssertionError) at the deadline.

Every timeout is stretched by WGCNI_TEST_TIME_SCALE (default 1): the VM tier (software-emulated CPU, Python much
slower) sets it, so the same tests prove the same behaviour there, only with longer patience.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from wgcni_lab import polling

TIME_SCALE = float(os.environ.get("WGCNI_TEST_TIME_SCALE", "1"))


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition", *,
               interval: float = 0.05, detail: Callable[[], object] | None = None) -> Any:
    """Return the first truthy answer of `predicate`; fail the test if none comes within `timeout` (scaled)."""
    return polling.wait_until(predicate, timeout * TIME_SCALE, what, interval=interval, error=AssertionError,
                              detail=detail)
