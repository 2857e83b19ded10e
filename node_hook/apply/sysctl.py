"""Sysctl applier: reads and writes `/proc/sys/<name>` (names use `/`, e.g. `net/ipv4/conf/all/src_valid_mark`).

The first time the hook changes a sysctl it records the original value in a JSON file in the state directory
(written atomically before the change), so `restore()` — run by `wgcni-node cleanup` — puts back exactly what was
there, even after restarts. net.ipv4.conf.* sysctls are per network namespace: this touches the namespace the
process runs in.
"""

from __future__ import annotations

import json
from pathlib import Path

from cni_plugin.files import write_atomically


class Sysctls:
    def __init__(self, originals_file: Path, root: Path = Path("/proc/sys")) -> None:
        self.originals_file = Path(originals_file)
        self.root = Path(root)

    def read(self, names: list[str]) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for name in names:
            try:
                values[name] = (self.root / name).read_text().strip()
            except FileNotFoundError:
                values[name] = None
        return values

    def _originals(self) -> dict[str, str]:
        try:
            return json.loads(self.originals_file.read_text())
        except FileNotFoundError:
            return {}

    def _save_originals(self, originals: dict[str, str]) -> None:
        self.originals_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.originals_file, json.dumps(originals, indent=1, sort_keys=True).encode(), 0o644,
                         temporary_prefix=f".{self.originals_file.name}.tmp.")

    def write(self, values: dict[str, str]) -> None:
        originals = self._originals()
        current = self.read(list(values))
        missing = [name for name, value in current.items() if value is None]
        if missing:
            raise OSError(f"sysctl {missing[0]} does not exist")
        recorded = False
        for name, value in current.items():
            if name not in originals and value is not None:
                originals[name] = value
                recorded = True
        if recorded:
            self._save_originals(originals)
        for name, value in values.items():
            (self.root / name).write_text(f"{value}\n")

    def restore(self) -> None:
        for name, value in self._originals().items():
            path = self.root / name
            if path.exists():  # per-device sysctls vanish with the device
                path.write_text(f"{value}\n")
        self.originals_file.unlink(missing_ok=True)
