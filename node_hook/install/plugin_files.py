"""The plugin in the CNI bin dir: installed atomically, found current cheaply, removed.

A single executable is copied to `<bin>/wgcni` (atomically, 0755). A PyInstaller one-directory bundle goes to
`<bin>/wgcni.bundle/<sha256>/`, every file fsynced before the directory is renamed into place, and `<bin>/wgcni`
becomes a symlink swapped atomically onto it. The version is a digest of the bundle's relative paths, exec bits and
contents, cached by every file's inode, size, mtime and mode, so that the watcher's passes do not hash it again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from cni_plugin.files import fsync_directory, replace_symlink, write_atomically
from node_hook.install.errors import InstallError
from node_hook.install.settings import PLUGIN_TYPE, TEMPORARY_PREFIX

BUNDLE_DIR_NAME = PLUGIN_TYPE + ".bundle"


def _tree_files(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Every file and symlink under `root` (or `root` itself when it is a file), sorted by relative path."""
    if not root.is_dir():
        return [("", root, root.lstat())]
    files = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(directory, filename)
            files.append((path.relative_to(root).as_posix(), path, path.lstat()))
    return files


# Digests by (path, every file's relative path/inode/size/mtime/mode): the watcher re-checks the plugin on every pass.
_digest_cache: dict[tuple, str] = {}


def _digest(root: Path) -> str:
    """sha256 over the relative paths, exec bits and contents of a file or a directory tree (symlinks by target)."""
    files = _tree_files(root)
    signature = (str(root), tuple((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode) for rel, _, st in files))
    if signature in _digest_cache:
        return _digest_cache[signature]
    digest = hashlib.sha256()
    for relative, path, file_stat in files:
        if stat.S_ISLNK(file_stat.st_mode):
            digest.update(f"L {relative} {os.readlink(path)}\n".encode())
            continue
        # A bundle's exec bits are part of it; a single file is always installed 0755, so only its bytes count.
        digest.update(f"F {relative} {file_stat.st_mode & 0o111 if relative else 0:o}\n".encode())
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    _digest_cache[signature] = digest.hexdigest()
    return _digest_cache[signature]


def _fsync_tree(root: Path) -> None:
    for directory, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(directory, filename)
            if not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_directory(directory)


def install_plugin(source: Path, bin_dir: Path) -> bool:
    """Install `source` (executable file or one-directory bundle) as `<bin_dir>/wgcni`; False when already current."""
    destination = bin_dir / PLUGIN_TYPE
    bundles = bin_dir / BUNDLE_DIR_NAME
    if source.is_dir():
        executable = source / PLUGIN_TYPE
        if not (executable.is_file() and os.access(executable, os.X_OK)):
            raise InstallError(f"plugin bundle {source} has no executable {PLUGIN_TYPE}; rebuild it (make build)")
        version = _digest(source)
        target = f"{BUNDLE_DIR_NAME}/{version}/{PLUGIN_TYPE}"
        if destination.is_symlink() and os.readlink(destination) == target and (bundles / version).is_dir():
            return False
        previous = os.readlink(destination) if destination.is_symlink() else None
        bundles.mkdir(mode=0o755, exist_ok=True)
        if not (bundles / version).is_dir():
            staging = Path(tempfile.mkdtemp(dir=bundles, prefix=TEMPORARY_PREFIX))
            try:
                shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
                os.chmod(staging, 0o755)
                _fsync_tree(staging)  # the symlink must never point at a bundle a power loss could leave truncated
                os.replace(staging, bundles / version)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_directory(bundles)  # nor at a name whose rename a power loss could undo
        replace_symlink(destination, target, temporary_prefix=TEMPORARY_PREFIX)
        # Keep the bundle the previous symlink pointed at: a plugin started just before the swap may still load from it.
        keep = {version}
        if previous and previous.startswith(BUNDLE_DIR_NAME + "/"):
            keep.add(Path(previous).parts[1])
        for stale in bundles.iterdir():
            if stale.name not in keep:
                shutil.rmtree(stale, ignore_errors=True)
        return True
    if not source.is_file():
        raise InstallError(f"plugin {source} not found; pass --plugin FILE (the built dist/bin/wgcni)")
    if (destination.is_file() and not destination.is_symlink() and os.access(destination, os.X_OK)
            and _digest(destination) == _digest(source)):
        return False
    with open(source, "rb") as original:
        write_atomically(destination, iter(lambda: original.read(1 << 20), b""), 0o755,
                         temporary_prefix=TEMPORARY_PREFIX)
    shutil.rmtree(bundles, ignore_errors=True)
    return True


def remove_plugin(bin_dir: Path) -> bool:
    """Remove `<bin_dir>/wgcni` and its bundles; False when nothing was there."""
    destination = bin_dir / PLUGIN_TYPE
    removed = False
    if destination.is_symlink() or destination.exists():
        os.unlink(destination)
        removed = True
    if (bin_dir / BUNDLE_DIR_NAME).is_dir():
        shutil.rmtree(bin_dir / BUNDLE_DIR_NAME)
        removed = True
    return removed
