"""The wgcni DaemonSet image, built from this checkout without a registry (`make image`, `python -m wgcni_lab.image`).

`packaging/image.sh` makes it: a root file system of Debian packages (mmdebstrap), the bundles of dist/ and buildah
committing both into an OCI archive. The result is cached by content (`wgcni_lab.buildcache`, kind "image"): the
package list, the build scripts, the bundles' input digests (`packaging/build.sh` writes them) and the image name; a
second build with the same inputs returns at once. The name is the one `conf/daemonset.yaml` runs, normalized as
containerd's CRI plugin resolves it (`wgcni:0.1.0` -> `docker.io/library/wgcni:0.1.0`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from wgcni_lab.buildcache import cached_build, content_key

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
DAEMONSET_FILE = REPO / "conf" / "daemonset.yaml"
BUNDLES = ("wgcni", "wgcni-node")
TOOLS = ("mmdebstrap", "buildah")
ARCHIVE_NAME = "wgcni.oci.tar"


class ImageError(RuntimeError):
    """The image cannot be built; the message says why in one line."""


@dataclass(frozen=True)
class Image:
    archive: Path
    name: str
    directory: Path

    def sizes(self) -> list[tuple[int, str]]:
        """(KiB, part) of image.sh's size report."""
        return [(int(kib), part) for kib, part in
                (line.split("\t", 1) for line in (self.directory / "sizes.txt").read_text().splitlines())]


def normalized(reference: str) -> str:
    """An image reference as containerd names it: docker.io/library/ for a bare name, :latest without a tag."""
    name, _, tag = reference.rpartition(":") if ":" in reference.rsplit("/", 1)[-1] else (reference, "", "latest")
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}:{tag}"


def daemonset_image(daemonset_file: Path = DAEMONSET_FILE) -> str:
    """The one image every container of the DaemonSet runs, normalized."""
    spec = yaml.safe_load(daemonset_file.read_text())["spec"]["template"]["spec"]
    images = {container["image"] for container in spec.get("initContainers", []) + spec["containers"]}
    if len(images) != 1:
        raise ImageError(f"{daemonset_file}: the containers run {sorted(images)}, expected one image")
    return normalized(images.pop())


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def image_key(name: str) -> str:
    digests = []
    for bundle in BUNDLES:
        stamp = REPO / "dist" / bundle / ".inputs-sha256"
        if not stamp.is_file():
            raise ImageError(f"dist/{bundle} is not built: run `make build`")
        digests.append(stamp)
    return content_key([PACKAGING / "image-packages.txt", PACKAGING / "rootfs.sh", PACKAGING / "image.sh",
                        *digests, name])


def cached_image(name: str | None = None) -> Image | None:
    """The image for the current inputs if it was built already, else None (never builds)."""
    from wgcni_lab.buildcache import cache_root

    name = name or daemonset_image()
    directory = cache_root() / "image" / image_key(name)
    return Image(directory / ARCHIVE_NAME, name, directory) if (directory / ARCHIVE_NAME).is_file() else None


def build_image(name: str | None = None) -> Image:
    """Build (or find in the cache) the image for the current inputs."""
    name = name or daemonset_image()
    missing = missing_tools()
    if missing:
        raise ImageError(f"{', '.join(missing)} not installed (run `make deps`): the image cannot be built")

    def build(out: Path) -> None:
        result = subprocess.run(["bash", str(PACKAGING / "image.sh"), str(out), name], capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise ImageError(f"packaging/image.sh failed ({result.returncode}): {lines[-1] if lines else 'no output'}")

    directory = cached_build("image", image_key(name), build)
    return Image(directory / ARCHIVE_NAME, name, directory)


def main() -> int:
    started = time.monotonic()
    try:
        image = build_image()
    except ImageError as error:
        print(f"make image: {error}", file=sys.stderr)
        return 1
    print(f"image {image.name}: {image.archive} ({time.monotonic() - started:.1f} s)")
    for kib, part in image.sizes():
        print(f"  {kib / 1024:7.1f} MiB  {part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
