"""The conflist on disk: which file is active, its backup, one edit planned then applied atomically, and its undo.

The active config is the first file by name in the conf dir among *.conf, *.conflist, *.json (libcni's ConfFiles
order, which containerd's CRI plugin and kubelet use); wgcni edits only that one, and refuses a symlink or a file that
is not UTF-8. The original of every file wgcni edits is kept beside it as `<file>.wgcni-backup` (an extension no CNI
loader reads, like Cilium's `.cilium_bak`), refreshed whenever the file's owner (Azure CNS) rewrites it. Undoing writes
the backup's bytes back when the file is still what wgcni made of it, otherwise removes only the wgcni entry from the
current file. Every write keeps the owner and mode of the file it replaces and is atomic and durable
(cni_plugin/files.py).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cni_plugin.files import fsync_directory, write_atomically
from node_hook.install.conflist_text import has_entry, insert_entry, strip_entries
from node_hook.install.errors import InstallError
from node_hook.install.settings import TEMPORARY_PREFIX

CNI_CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")  # libcni ConfFiles, as used by containerd and kubelet
BACKUP_SUFFIX = ".wgcni-backup"


def active_config(conf_dir: Path) -> Path | None:
    """The config file the runtime uses: the first by name among *.conf, *.conflist, *.json (directories skipped)."""
    try:
        entries = sorted(os.scandir(conf_dir), key=lambda entry: entry.name)
    except FileNotFoundError:
        return None
    for entry in entries:
        if os.path.splitext(entry.name)[1] in CNI_CONFIG_EXTENSIONS and not entry.is_dir():
            return Path(entry.path)
    return None


def _write_like(path: Path, data: bytes, like: os.stat_result) -> None:
    """Replace `path` with `data` atomically and durably, with the owner and mode of `like`."""
    write_atomically(path, data, stat.S_IMODE(like.st_mode), temporary_prefix=TEMPORARY_PREFIX,
                     owner=(like.st_uid, like.st_gid))


def _backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    with open(path, "rb") as handle:
        return handle.read(), os.fstat(handle.fileno())


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InstallError(f"{name} is not UTF-8 text; wgcni changed nothing") from None


@dataclass(frozen=True)
class ConflistPlan:
    """What install-cni will write into the active conflist (computed before anything is touched)."""

    path: Path
    original: bytes  # the file as read
    new_text: str | None  # None: already as wanted
    backup: bytes | None  # None: keep the existing backup
    stat: os.stat_result


def plan_conflist(conf_dir: Path, entry: dict) -> ConflistPlan:
    """Read the active conflist and compute the edit; raises InstallError with nothing changed."""
    path = active_config(conf_dir)
    if path is None:
        raise InstallError(f"no CNI config (*.conf, *.conflist, *.json) in {conf_dir}; is Azure CNI installed?")
    if path.is_symlink():
        raise InstallError(f"{path} is a symlink; wgcni edits only regular files, wgcni changed nothing")
    original, file_stat = _read(path)
    text = _decode(original, str(path))
    new_text = insert_entry(text, entry, str(path))
    backup_path = _backup_path(path)
    existing_backup = backup_path.read_bytes() if backup_path.is_file() else None
    if not has_entry(text):
        backup = original  # the owner's current version is the one to restore
    elif existing_backup is None:
        backup = strip_entries(text, str(path)).encode("utf-8")
    else:
        backup = None
    if backup == existing_backup:
        backup = None
    return ConflistPlan(path, original, None if new_text == text else new_text, backup, file_stat)


def apply_conflist(plan: ConflistPlan) -> bool:
    """Write the backup then the conflist; False when the file changed since it was read (caller re-plans).

    A writer that replaces the file in the microseconds between this re-read and our rename loses its version to
    ours: no lock can exclude Azure CNS, which does not take one. Its earlier versions are never lost.
    """
    current, _ = _read(plan.path)
    if current != plan.original:
        return False
    if plan.backup is not None:
        _write_like(_backup_path(plan.path), plan.backup, plan.stat)
    if plan.new_text is not None:
        _write_like(plan.path, plan.new_text.encode("utf-8"), plan.stat)
    return True


def _restore(path: Path, backup: Path) -> str | None:
    """Undo wgcni's edit of `path` using `backup`; returns what was done, None when there was nothing to undo."""
    if not path.is_file() or path.is_symlink():
        return None
    current, file_stat = _read(path)
    text = _decode(current, str(path))
    if not has_entry(text):
        return None
    original = backup.read_bytes() if backup.is_file() else None
    stripped = strip_entries(text, str(path))
    if original is not None and json.loads(stripped) == json.loads(_decode(original, str(backup))):
        _write_like(path, original, file_stat)
        return f"restored {path} from {backup.name}"
    _write_like(path, stripped.encode("utf-8"), file_stat)
    return f"removed the wgcni entry from {path} (it changed since install; backup not used)"


def restore_conflists(conf_dir: Path) -> list[str]:
    """Take wgcni out of every config file in `conf_dir` (restoring originals) and remove the backups; returns what
    changed. The caller holds the conf dir's lock."""
    changes: list[str] = []
    names = sorted(os.listdir(conf_dir))
    for name in names:
        path = conf_dir / name
        if os.path.splitext(name)[1] in CNI_CONFIG_EXTENSIONS:
            done = _restore(path, _backup_path(path))
            if done:
                changes.append(done)
    for name in names:
        if name.endswith(BACKUP_SUFFIX):
            os.unlink(conf_dir / name)
            changes.append(f"removed {conf_dir / name}")
    fsync_directory(conf_dir)
    return changes
