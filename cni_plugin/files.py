"""Files written safely, shared by the plugin and the node hook: opening a file whose directory may not exist yet
(the plugin's log, record lock and records) and atomic writes (pod records; conflists, the plugin binary, the node
key and state files in the hook).

A write goes to a temporary file in the target's own directory, named ``<temporary_prefix><pid>.<random>`` so that
whoever reads or sweeps that directory can tell temporaries by their prefix. The temporary gets its content, owner
and mode before it is renamed over the target, so a reader sees the old file or the whole new one, never a partial
one or one with other permissions. A failure at any step removes the temporary and leaves the target as it was.
With ``durable`` the file is fsynced before the rename and the directory after it: once the call returns, the new
content survives a power loss.

Standard library only, and nothing beyond the C modules ``posix`` and ``errno``: the plugin imports this module on
every ADD and DEL, and importing ``os`` (which wraps ``posix``) would cost it more than a millisecond
(docs/benchmarks.md, P1). Paths are the ``str`` or path-like objects ``os`` takes.
"""

import errno
import posix

TYPE_CHECKING = False
if TYPE_CHECKING:
    import os
    from collections.abc import Iterable


def open_creating_directory(path: str, flags: int) -> int:
    """``os.open(path, flags, 0o600)``; when the directory that holds ``path`` does not exist yet, create it (and
    its parents, mode 0700) and open again. One ``open`` whenever the directory exists: the plugin's ADD/DEL path
    does not stat it on every invocation."""
    try:
        return posix.open(path, flags, 0o600)
    except FileNotFoundError:
        import os  # only the first write into a new directory pays for os

        os.makedirs(directory_of(path), mode=0o700, exist_ok=True)
        return posix.open(path, flags, 0o600)


def fsync_directory(directory: "str | os.PathLike[str]") -> None:
    """Make the entries of ``directory`` (renames, links, removals) durable. A filesystem that cannot fsync a
    directory (EINVAL) is left at that: the change itself has happened."""
    fd = posix.open(directory, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        posix.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        posix.close(fd)


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
    path = posix.fspath(path)
    directory = directory_of(path)
    temporary = _temporary_path(directory, temporary_prefix)
    flags = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC
    fd = open_creating_directory(temporary, flags) if create_directory else posix.open(temporary, flags, 0o600)
    try:
        try:
            for chunk in (content,) if isinstance(content, bytes) else content:
                view = memoryview(chunk)
                while view:
                    view = view[posix.write(fd, view):]
            if owner is not None:
                posix.fchown(fd, *owner)
            posix.fchmod(fd, mode)
            if durable:
                posix.fsync(fd)
        finally:
            posix.close(fd)
        if exclusive:
            try:
                posix.link(temporary, path)
                written = True
            except FileExistsError:
                written = False
            posix.unlink(temporary)
        else:
            posix.replace(temporary, path)
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
    link = posix.fspath(link)
    directory = directory_of(link)
    temporary = _temporary_path(directory, temporary_prefix)
    posix.symlink(target, temporary)
    try:
        posix.replace(temporary, link)
    except BaseException:
        _remove_if_present(temporary)
        raise
    if durable:
        fsync_directory(directory)


def directory_of(path: str) -> str:
    """The directory holding ``path``: ``os.path.dirname(path) or "."``, up to how repeated slashes are spelt."""
    head, slash, _ = path.rpartition("/")
    return head.rstrip("/") or slash or "."


def join(directory: str, name: str) -> str:
    """``os.path.join(directory, name)`` for a ``name`` that is one relative path component."""
    return f"{directory}{name}" if not directory or directory.endswith("/") else f"{directory}/{name}"


def _temporary_path(directory: str, prefix: str) -> str:
    return join(directory, f"{prefix}{posix.getpid()}.{posix.urandom(4).hex()}")


def _remove_if_present(path: str) -> None:
    try:
        posix.unlink(path)
    except FileNotFoundError:
        pass
