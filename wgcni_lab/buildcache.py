"""Build-once cache for the lab's machine-local artefacts (pause image, test drivers).

Artefacts built from sources in the tree (the static pause binary and its OCI archive, the libcni test
driver) are built at most once per machine and source version: each lives in its own directory named after
a hash of everything it is built from, under `.build/lab-cache/` of the checkout (or `$WGCNI_LAB_CACHE`).
A build runs under an exclusive lock in a temporary directory that is renamed into place only when the
builder succeeded, so parallel test workers never see a half-built artefact and a failed build leaves
nothing behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

CACHE_ENV = "WGCNI_LAB_CACHE"


def cache_root() -> Path:
    """The cache directory: `$WGCNI_LAB_CACHE`, else `<checkout>/.build/lab-cache`."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / ".build" / "lab-cache"


def content_key(parts: Iterable[bytes | str | Path]) -> str:
    """A short hex digest over byte strings, text and file contents (paths are read)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            data = part.read_bytes()
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:20]


def cached_build(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return `<cache>/<kind>/<key>/`, running `build(tmpdir)` to fill it if it does not exist yet.

    `build` writes its outputs into the directory it is given; an exception from it propagates and the
    partial output is removed.
    """
    kind_dir = cache_root() / kind
    kind_dir.mkdir(parents=True, exist_ok=True)
    final = kind_dir / key
    if final.is_dir():
        return final
    with open(kind_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=kind_dir))
        try:
            build(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final
