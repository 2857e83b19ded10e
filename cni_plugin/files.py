"""Files written safely, shared by the plugin and the node hook: opening a file whose directory may not exist yet
(the plugin's log, record lock and records) and atomic writes (pod records; conflists, the plugin binary, the node
key and state files in the hook).

A write goes to a temporary file in the target's own directory, named ``<temporary_prefix><pid>.<random>`` so that
whoever reads or sweeps that directory can tell temporaries by their prefix. The temporary gets its content, owner
and mode before it is renamed over the target, so a reader sees the old file or the whole new one, never a partial
one or one with other permissions. A failure at any step removes the temporary and leaves the target as it was.
With ``durable`` the file is fsynced before the rename and the directory after it: once the call returns, the new
content survives a power loss.

Standard library only, and nothing beyond ``os`` and ``errno`` (both loaded anyway): the plugin imports this module
on every ADD and DEL.
"""

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


def open_creating_directory(path: str, flags: int) -> int:
    """``os.open(path, flags, 0o600)``; when the directory that holds ``path`` does not exist yet, create it (and
    its parents, mode 0700) and open again. One ``open`` whenever the directory exists: the plugin's ADD/DEL path
    does not stat it on every invocation."""
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, flags, 0o600)


def fsync_directory(directory: "str | os.PathLike[str]") -> None:
    """Make the entries of ``directory`` (renames, links, removals) durable. A filesystem that cannot fsync a
    directory (EINVAL) is left at that: the change itself has happened."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def write_atomically(
    path: "str | os.PathLike[str]",
    content: "bytes | Iterable[bytes]",
    mode: int,
    *,
    temporary_prefix: str,
    owner: "tuple[int, int] | None" = None,
    durable: bool = True,
    exclusive: bool = False,
    create_directory: bool = False,
    sync_directory: bool = True,
) -> bool:
    """Give ``path`` the ``content`` (bytes, or chunks of bytes written one after the other) with exactly ``mode``
    and, when given, ``owner`` (uid, gid).

    ``exclusive``: create ``path`` only if it does not exist (a hard link instead of a rename); returns False, and
    leaves the existing file alone, when it does. Otherwise ``path`` is replaced and the result is True.
    ``create_directory``: create the missing directory of ``path`` (mode 0700) instead of failing.
    ``sync_directory=False`` (with ``durable``): the file is fsynced before the rename, and the directory's fsync
    (``fsync_directory``) is left to the caller, who may do something else first; durable only once that returns.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    temporary = _temporary_path(directory, temporary_prefix)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = open_creating_directory(temporary, flags) if create_directory else os.open(temporary, flags, 0o600)
    try:
        try:
            for chunk in (content,) if isinstance(content, bytes) else content:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(temporary, path)
                written = True
            except FileExistsError:
                written = False
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
            written = True
    except BaseException:
        _remove_if_present(temporary)
        raise
    if durable and sync_directory:
        fsync_directory(directory)
    return written


def replace_symlink(link: "str | os.PathLike[str]", target: str, *, temporary_prefix: str,
                    durable: bool = True) -> None:
    """Point ``link`` at ``target`` in one rename: a lookup of ``link`` finds the old target or the new one."""
    link = os.fspath(link)
    directory = os.path.dirname(link) or "."
    temporary = _temporary_path(directory, temporary_prefix)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        _remove_if_present(temporary)
        raise
    if durable:
        fsync_directory(directory)


def _temporary_path(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}{os.getpid()}.{os.urandom(4).hex()}")


def _remove_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
