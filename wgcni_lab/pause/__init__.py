"""The lab's sandbox ("pause") image, built locally because no registry is reachable.

`pause.c` is compiled with `gcc -static` and wrapped into an OCI image-layout archive (one uncompressed
layer holding `/pause`) whose index carries the `io.containerd.image.name` annotation, so that
`ctr -n k8s.io images import` registers it under `PauseImage.name` — the value containerd's CRI
`sandbox_image` setting points at. The archive is built once per machine and source version
(see `wgcni_lab.buildcache`).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from wgcni_lab.buildcache import cached_build, content_key

SOURCE = Path(__file__).resolve().parent / "pause.c"
ARCHIVE_NAME = "pause-oci.tar"
IMAGE_REPOSITORY = "wgcni.local/pause"

_OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class PauseImage:
    """A built pause image: the archive to import and the name it is imported under."""

    archive: Path
    name: str


def pause_image(cc: str = "gcc") -> PauseImage:
    """Build (once) and return the pause image archive for this machine's architecture."""
    arch = _OCI_ARCH.get(platform.machine(), platform.machine())
    key = content_key([SOURCE, Path(__file__).resolve(), cc, arch])
    name = f"{IMAGE_REPOSITORY}:{key}"
    directory = cached_build("pause", key, lambda out: _build(out, cc, arch, name))
    return PauseImage(archive=directory / ARCHIVE_NAME, name=name)


def _build(out: Path, cc: str, arch: str, name: str) -> None:
    binary = out / "pause"
    result = subprocess.run(
        [cc, "-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the pause binary with {cc} failed: {result.stderr.strip()}")
    layer = _tar_bytes({"pause": (binary.read_bytes(), 0o755)})
    layer_digest = _digest(layer)
    config = _json_bytes(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    )
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
        }
    )
    manifest_descriptor = _descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    manifest_descriptor["platform"] = {"architecture": arch, "os": "linux"}
    manifest_descriptor["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
    }
    index = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [manifest_descriptor],
        }
    )
    members = {
        "oci-layout": (_json_bytes({"imageLayoutVersion": "1.0.0"}), 0o644),
        "index.json": (index, 0o644),
    }
    for blob in (layer, config, manifest):
        members[f"blobs/sha256/{_digest(blob).split(':', 1)[1]}"] = (blob, 0o644)
    (out / ARCHIVE_NAME).write_bytes(_tar_bytes(members))


def _descriptor(media_type: str, blob: bytes) -> dict:
    return {"mediaType": media_type, "digest": _digest(blob), "size": len(blob)}


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _tar_bytes(members: dict[str, tuple[bytes, int]]) -> bytes:
    """A reproducible tar (fixed owner and mtime) of regular files, with their parent directories."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directories = sorted({str(parent) for path in members for parent in Path(path).parents} - {"."})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
        for path, (data, mode) in sorted(members.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = mode
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
