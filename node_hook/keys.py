"""The node's X25519 WireGuard key: created once in `<stateDir>/private.key` (dir 0700, file 0600), reused forever.

The file holds the base64 private key and a newline, exactly like `wg genkey` output, so operators can use
`wg pubkey < private.key`. The private key is never logged or printed; only the public key leaves this module
in text form.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from nacl.public import PrivateKey

from cni_plugin.files import write_atomically


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


def load_or_create(path: Path) -> NodeKey:
    """Return the key in `path`, creating it atomically (0600, parent 0700) when it does not exist."""
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
