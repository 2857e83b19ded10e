"""A short temporary directory for tests: Unix socket paths (the hook's local API, containerd's CRI) must stay
under 108 bytes, which pytest's own tmp_path does not guarantee."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_temp_dir(prefix: str) -> Iterator[Path]:
    """A new directory under the system temp dir, named `prefix` plus a random part; removed with its contents
    afterwards, also when the block fails."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
