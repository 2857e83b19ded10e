"""The node's X25519 WireGuard key: created once in `<stateDir>/private.key` (dir 0700, file 0600), kept until a
rotation replaces it.

The file holds the base64 private key and a newline, exactly like `wg genkey` output, so operators can use
`wg pubkey < private.key`. A rotation (`KeyStore`, docs/design.md "Key rotation") first creates the next key in
`private.key.next` (same format and mode), so a hook restarted in the middle of one carries on with the same next
key, and at the switch renames it over `private.key` (one rename: the node always has exactly one current key).
`private.key.published` names the public key the API was last seen to hold (empty from the moment a key is created
until then): a restarted hook trusts its tunnel before its first list only when that is its own key, so a node whose
key its peers cannot know (reimaged, key file lost, crashed before it published) sends in plaintext, not into a
tunnel no peer takes, and still reaches the API server (docs/design.md "Key rotation").
The private key is never logged or printed; only the public key leaves this module in text form.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from nacl.public import PrivateKey

from cni_plugin.files import fsync_directory, write_atomically


class KeyFileError(Exception):
    """The key file exists but cannot be used (unreadable, wrong size, not base64)."""


@dataclass(frozen=True)
class NodeKey:
    private: bytes  # 32 raw bytes; never logged
    public_key: str = field(init=False)  # base64, derived once from `private` when the key is loaded

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", base64.b64encode(bytes(PrivateKey(self.private).public_key)).decode())

    def __repr__(self) -> str:  # keep the private key out of logs and tracebacks
        return f"NodeKey(public_key={self.public_key!r})"


def public_key_of(private: bytes) -> str:
    return NodeKey(private).public_key


def _decode(text: str, path: Path) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise KeyFileError(f"{path}: not a base64 WireGuard private key") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: a WireGuard private key is 32 bytes, this one is {len(raw)}")
    return raw


def published_marker(path: Path) -> Path:
    """The file naming the public key the API last held for the key in `path`."""
    return Path(path).with_name(Path(path).name + ".published")


def load_or_create(path: Path) -> NodeKey:
    """Return the key in `path`, creating it atomically (0600, parent 0700) when it does not exist; a new key's
    published marker says that no API holds it yet."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        return NodeKey(_decode(path.read_text(), path))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"{path}: cannot read the key: {error}") from None
    private = bytes(PrivateKey.generate())
    write_atomically(published_marker(path), b"", 0o600, temporary_prefix=f".{path.name}.published.tmp.")
    # Exclusive: when another process created the key meanwhile, both use the winner's key.
    write_atomically(path, base64.b64encode(private) + b"\n", 0o600, temporary_prefix=f".{path.name}.tmp.",
                     exclusive=True)
    return NodeKey(_decode(path.read_text(), path))


def load_existing(path: Path) -> NodeKey:
    """Return the key in `path` without creating one (for `show-key`)."""
    try:
        return NodeKey(_decode(Path(path).read_text(), Path(path)))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no key yet; it is created by 'wgcni-node run'") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"{path}: cannot read the key: {error}") from None


class KeyStore:
    """The key files of one node: the current key and, during a rotation, the next one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.next_path = self.path.with_name(self.path.name + ".next")
        self.published_path = published_marker(self.path)
        self._published: str | None = None  # the marker's content as last read or written

    def last_published(self) -> str | None:
        """The public key the API last held, "" for none since the key was created, None for no marker (a key
        file from before markers: taken as published, so an upgrade keeps the mesh)."""
        if self._published is None:
            try:
                self._published = self.published_path.read_text().strip()
            except FileNotFoundError:
                return None
        return self._published

    def mark_published(self, public_key: str) -> None:
        """Record that the API holds `public_key` (written only when that changes)."""
        if public_key != self.last_published():
            write_atomically(self.published_path, public_key.encode() + b"\n", 0o600,
                             temporary_prefix=f".{self.published_path.name}.tmp.")
            self._published = public_key

    def current(self) -> NodeKey:
        return load_or_create(self.path)

    def pending(self) -> NodeKey | None:
        """The next key a rotation created and has not switched to yet, or None."""
        try:
            return NodeKey(_decode(self.next_path.read_text(), self.next_path))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise KeyFileError(f"{self.next_path}: cannot read the next key: {error}") from None

    def create_next(self) -> NodeKey:
        """The pending next key, created (0600, durable) when there is none."""
        pending = self.pending()
        if pending is not None:
            return pending
        write_atomically(self.next_path, base64.b64encode(bytes(PrivateKey.generate())) + b"\n", 0o600,
                         temporary_prefix=f".{self.next_path.name}.tmp.", exclusive=True)
        pending = self.pending()
        assert pending is not None  # just written (or written by a concurrent caller, whose key both then use)
        return pending

    def promote_next(self) -> NodeKey:
        """Make the next key the current one (one durable rename) and return it."""
        pending = self.pending()
        if pending is None:
            raise KeyFileError(f"{self.next_path}: no next key to switch to")
        os.replace(self.next_path, self.path)
        fsync_directory(self.path.parent)
        return pending

    def created_at(self) -> float:
        """Unix time the current key file was written (its mtime; a rotation's rename keeps the next key's)."""
        return self.path.stat().st_mtime
