"""The atomic-write helper shared by the plugin and the hook: content, exact mode and owner, no temporary left
behind by a failure at any step, the target untouched by a failed write, and the fsyncs `durable` promises."""

from __future__ import annotations

import os
import re
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_plugin import files
from cni_plugin.files import directory_of, fsync_directory, join, replace_symlink, write_atomically

PREFIX = ".test-tmp."


@pytest.fixture
def fsyncs(monkeypatch):
    """The kind (file or directory) of every descriptor the helper fsyncs, in order."""
    kinds: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        kinds.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(files.posix, "fsync", recording_fsync)
    return kinds


@pytest.fixture
def umask():
    """A umask that would strip group and other bits from anything created with default permissions."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755], ids=oct)
def test_content_and_exact_mode_whatever_the_umask(tmp_path, umask, mode):
    path = tmp_path / "file"
    assert write_atomically(path, b"content\n", mode, temporary_prefix=PREFIX) is True
    assert path.read_bytes() == b"content\n"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert listing(tmp_path) == ["file"]


def test_replaces_an_existing_file_with_a_new_inode(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"old, and longer than the new content")
    before = path.stat().st_ino
    write_atomically(str(path), b"new", 0o644, temporary_prefix=PREFIX)
    assert path.read_bytes() == b"new" and path.stat().st_ino != before


def test_chunks_are_written_in_order(tmp_path):
    path = tmp_path / "file"
    write_atomically(path, iter([b"one ", b"", b"two ", b"three"]), 0o644, temporary_prefix=PREFIX)
    assert path.read_bytes() == b"one two three"


def test_owner_is_set(tmp_path):
    path = tmp_path / "file"
    write_atomically(path, b"x", 0o640, temporary_prefix=PREFIX, owner=(os.getuid(), os.getgid()))
    assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid())


def test_the_temporary_is_in_the_same_directory_under_the_prefix(tmp_path):
    seen: list[str] = []

    def chunks():
        seen.extend(listing(tmp_path))
        yield b"x"

    write_atomically(tmp_path / "file", chunks(), 0o644, temporary_prefix=PREFIX)
    [temporary] = seen
    assert temporary.startswith(f"{PREFIX}{os.getpid()}.")


def failing_chunks():
    yield b"half of the "
    raise OSError("disk full")


@pytest.mark.parametrize("step", ["write", "fchmod", "fsync", "replace"])
def test_a_failure_at_any_step_leaves_no_temporary_and_the_target_as_it_was(tmp_path, monkeypatch, step):
    path = tmp_path / "file"
    path.write_bytes(b"original")
    content: object = b"new content"
    if step == "write":
        content = failing_chunks()
    else:
        def fail(*_args):
            raise OSError(f"{step} failed")

        monkeypatch.setattr(files.posix, step, fail)
    with pytest.raises(OSError):
        write_atomically(path, content, 0o644, temporary_prefix=PREFIX)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert listing(tmp_path) == ["file"]
    assert path.read_bytes() == b"original"


def test_durable_fsyncs_the_file_then_the_directory(tmp_path, fsyncs):
    write_atomically(tmp_path / "file", b"x", 0o644, temporary_prefix=PREFIX)
    assert fsyncs == ["file", "directory"]


def test_not_durable_fsyncs_nothing(tmp_path, fsyncs):
    write_atomically(tmp_path / "file", b"x", 0o644, temporary_prefix=PREFIX, durable=False)
    assert fsyncs == []
    assert (tmp_path / "file").read_bytes() == b"x"


def test_exclusive_creates_a_missing_file(tmp_path, fsyncs):
    path = tmp_path / "key"
    assert write_atomically(path, b"mine", 0o600, temporary_prefix=PREFIX, exclusive=True) is True
    assert path.read_bytes() == b"mine" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_nlink == 1 and listing(tmp_path) == ["key"]
    assert fsyncs == ["file", "directory"]


def test_exclusive_leaves_an_existing_file_alone(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"the winner's")
    assert write_atomically(path, b"mine", 0o600, temporary_prefix=PREFIX, exclusive=True) is False
    assert path.read_bytes() == b"the winner's" and listing(tmp_path) == ["key"]


def test_create_directory_makes_the_missing_directory_private(tmp_path):
    path = tmp_path / "state" / "pods" / "record"
    write_atomically(path, b"x", 0o600, temporary_prefix=PREFIX, create_directory=True)
    assert path.read_bytes() == b"x"
    assert stat.S_IMODE((tmp_path / "state" / "pods").stat().st_mode) == 0o700


def test_a_missing_directory_is_an_error_without_create_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "missing" / "file", b"x", 0o644, temporary_prefix=PREFIX)
    assert listing(tmp_path) == []


def test_replace_symlink_swaps_the_target_and_fsyncs_the_directory(tmp_path, fsyncs):
    link = tmp_path / "wgcni"
    replace_symlink(link, "bundle/one/wgcni", temporary_prefix=PREFIX)
    replace_symlink(link, "bundle/two/wgcni", temporary_prefix=PREFIX)
    assert os.readlink(link) == "bundle/two/wgcni" and listing(tmp_path) == ["wgcni"]
    assert fsyncs == ["directory", "directory"]


def test_replace_symlink_failure_leaves_no_temporary_and_the_old_link(tmp_path, monkeypatch):
    link = tmp_path / "wgcni"
    replace_symlink(link, "bundle/one/wgcni", temporary_prefix=PREFIX)

    def fail(*_args):
        raise OSError("replace failed")

    monkeypatch.setattr(files.posix, "replace", fail)
    with pytest.raises(OSError):
        replace_symlink(link, "bundle/two/wgcni", temporary_prefix=PREFIX)
    monkeypatch.undo()
    assert os.readlink(link) == "bundle/one/wgcni" and listing(tmp_path) == ["wgcni"]


def test_fsync_directory_tolerates_a_filesystem_that_cannot(tmp_path, monkeypatch):
    def einval(_fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(files.posix, "fsync", einval)
    fsync_directory(tmp_path)


def same_directory(path: str) -> str:
    """``path`` with each run of slashes spelt as one (POSIX: ``a//b`` names ``a/b``)."""
    return re.sub("/+", "/", path)


PATHS = st.text(alphabet="a./", max_size=12)
COMPONENTS = st.text(alphabet="a.", min_size=1, max_size=4)


@given(PATHS)
def test_directory_of_names_the_directory_os_path_dirname_names(path):
    assert same_directory(directory_of(path)) == same_directory(os.path.dirname(path) or ".")


@given(PATHS, COMPONENTS)
def test_join_is_os_path_join_for_one_component(directory, name):
    assert join(directory, name) == os.path.join(directory, name)
