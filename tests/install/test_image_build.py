"""`make image` for real: the image is built from Debian packages and dist/ with mmdebstrap and buildah (cached by
content), and what it holds is what packaging/Dockerfile describes: the bundles at the Dockerfile's paths, its
symlinks, PATH and command, the packages of packaging/image-packages.txt and no shell or package manager. Skipped,
saying so, when the tools are not installed (`make deps` installs them)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

from tests.install.test_install_image import DIST, _final_stage, _symlinks
from wgcni_lab import image

pytestmark = pytest.mark.skipif(bool(image.missing_tools()),
                                reason=f"{', '.join(image.missing_tools())} not installed: `make deps`")

DEBIAN_PART_LIMIT_KIB = 40 * 1024  # the packages are 24 MiB pruned: a package pulling in recommends would show here


@pytest.fixture(scope="module")
def built():
    built = image.build_image()
    with tarfile.open(built.archive) as archive:
        def blob(digest: str) -> bytes:
            member = archive.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
            assert member is not None
            return member.read()

        index = json.loads(archive.extractfile("index.json").read())  # type: ignore[union-attr]
        (descriptor,) = index["manifests"]
        manifest = json.loads(blob(descriptor["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        (layer,) = manifest["layers"]
        data = blob(layer["digest"])
        assert hashlib.sha256(data).hexdigest() == layer["digest"].split(":", 1)[1]
        if layer["mediaType"].endswith("+gzip"):
            data = gzip.decompress(data)
    files = tarfile.open(fileobj=io.BytesIO(data))
    members = {member.name.removeprefix("./").rstrip("/"): member for member in files.getmembers()}
    return built, descriptor, config, files, members


def test_named_as_the_daemonset_runs_it(built):
    built_image, descriptor, _, _, _ = built
    assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == built_image.name
    assert built_image.name == "docker.io/library/wgcni:0.1.0"  # conf/daemonset.yaml's wgcni:0.1.0, as CRI resolves it


def test_the_dockerfiles_layout_path_and_command(built):
    _, _, config, files, members = built
    for link, target in _symlinks().items():
        member = members[link.lstrip("/")]
        assert member.issym() and member.linkname == target, link
    for bundle in ("wgcni", "wgcni-node"):  # the bundles exactly as dist/ has them (the Dockerfile's COPY)
        executable = files.extractfile(members[f"opt/wgcni/{bundle}/{bundle}"])
        assert executable is not None
        assert executable.read() == (DIST / bundle / bundle).read_bytes()
        shipped = {name for name in members if name.startswith(f"opt/wgcni/{bundle}/")}
        in_dist = {f"opt/wgcni/{bundle}/{path.relative_to(DIST / bundle)}" for path in (DIST / bundle).rglob("*")}
        assert shipped == in_dist
    env = dict(entry.split("=", 1) for entry in config["config"]["Env"])
    final = dict(_final_stage())
    assert f"PATH={env['PATH']}" == final["ENV"]
    assert config["config"]["Cmd"] == json.loads(final["CMD"])


def test_only_the_listed_packages(built):
    built_image, _, _, _, members = built
    for tool in ("usr/sbin/nft", "usr/bin/wireguard-go", "bin/ip", "usr/bin/wg"):
        assert members[tool].isfile(), tool
    for absent in ("bin/sh", "usr/bin/dash", "bin/bash", "usr/bin/dpkg", "usr/bin/apt", "usr/share/doc",
                   "usr/share/man", "usr/share/locale"):
        assert absent not in members, absent
    packages = [line.split("\t")[1].split()[0] for line in (built_image.directory / "packages.txt").read_text()
                .splitlines()]
    assert {"nftables", "wireguard-go", "iproute2", "wireguard-tools", "libc6"} <= set(packages)
    sizes = {part: kib for kib, part in built_image.sizes()}
    debian = next(kib for part, kib in sizes.items() if part.startswith("Debian packages"))
    assert debian < DEBIAN_PART_LIMIT_KIB, sizes
