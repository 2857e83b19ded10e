"""The PyInstaller-built binaries (dist/bin/wgcni, dist/bin/wgcni-node) for tests that run them as a node would.

``built_binary`` runs packaging/build.sh first, under a lock so that parallel test workers do not build at once.
The script rebuilds a bundle only when its inputs changed (a digest check of about a second), so the tests always
exercise binaries built from the sources under test, never a stale bundle.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD_LOCK = REPO / "build" / ".build.lock"


def built_binary(name: str) -> str:
    """Absolute path of dist/bin/<name>, (re)built from the current sources if needed."""
    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build = subprocess.run(["bash", str(REPO / "packaging" / "build.sh")], cwd=REPO,
                               env={**os.environ, "PY": sys.executable}, capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        raise RuntimeError(f"packaging/build.sh failed:\n{build.stdout}\n{build.stderr}")
    path = REPO / "dist" / "bin" / name
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"packaging/build.sh did not produce {path}")
    return str(path)
