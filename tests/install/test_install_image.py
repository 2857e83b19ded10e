"""packaging/Dockerfile without Docker: its sources exist after `make build`, its paths match install-cni's defaults and
the DaemonSet's commands, and the built bundles laid out as in the image install and run the plugin like on a node.
(tests/install/test_image_build.py builds the image with `make image`'s tools and holds it to this Dockerfile.)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from node_hook.install.settings import BUNDLED_PLUGIN

REPO = Path(__file__).parents[2]
DOCKERFILE = REPO / "packaging" / "Dockerfile"
DIST = REPO / "dist"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


ROOTFS_STAGE = "/rootfs"  # where the first stage assembles the file system the final stage copies whole


def _copies() -> dict[str, str]:
    """COPY destination -> source (build-context relative) of the final stage's copies from the build context
    (the first stage's copies of the build scripts and `COPY --from` skipped)."""
    copies = {}
    for keyword, arguments in _final_stage():
        if keyword == "COPY":
            words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
            if any(word.startswith("--from=") for word in words):
                continue
            words = [word for word in words if not word.startswith("--")]
            assert len(words) == 2, f"COPY {arguments}: one source per COPY keeps the layout obvious"
            copies[words[1].rstrip("/")] = words[0].rstrip("/")
    return copies


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last:]


def _symlinks() -> dict[str, str]:
    """Links made by `ln -s TARGET LINK` in RUN instructions, as the image has them: LINK -> TARGET."""
    links = {}
    for keyword, arguments in _instructions():
        if keyword == "RUN" and not arguments.startswith("["):
            for command in arguments.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["ln", "-s"]:
                    links[words[3].removeprefix(ROOTFS_STAGE)] = words[2]
    return links


def _image_path(path: str) -> Path:
    """Where a path of the image comes from in the build context (through COPY destinations and ln -s links)."""
    path = _symlinks().get(path, path)
    for destination, source in _copies().items():
        if path == destination or path.startswith(destination + "/"):
            return REPO / source / os.path.relpath(path, destination)
    raise AssertionError(f"{path} is not provided by any COPY in the Dockerfile")


def test_stages_and_packages():
    """The first stage runs packaging/rootfs.sh (as `make image` does) on Debian 12; the image is only its result
    and the bundles; the packages are real Debian 12 packages, the tools the hook calls and `ip`/`wg`."""
    instructions = _instructions()
    assert instructions[0] == ("FROM", "debian:12-slim AS rootfs")
    assert _final_stage()[0] == ("FROM", "scratch")
    assert ("COPY", "--from=rootfs /rootfs/ /") in _final_stage()
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert any(arguments.startswith("/build/rootfs.sh ") for arguments in runs)
    assert ("COPY", "packaging/rootfs.sh /build/rootfs.sh") in instructions
    assert ("COPY", "packaging/image-packages.txt /build/image-packages.txt") in instructions
    listed = (REPO / "packaging" / "image-packages.txt").read_text().splitlines()
    packages = {line.split("#")[0].strip() for line in listed} - {""}
    assert packages == {"wireguard-go", "wireguard-tools", "nftables", "iproute2", "busybox"}
    for package in packages:  # real Debian 12 package names (the Makefile installs them on this machine)
        subprocess.run(["dpkg-query", "-W", package], check=True, capture_output=True)


def test_image_paths_match_the_installer_and_the_daemonset():
    copies = _copies()
    assert str(BUNDLED_PLUGIN) in copies, "install-cni's default --plugin must be what the image ships"
    assert copies[str(BUNDLED_PLUGIN)] == "dist/wgcni"
    daemonset = yaml.safe_load((REPO / "conf" / "daemonset.yaml").read_text())["spec"]["template"]["spec"]
    on_path = {Path(link).name for link in _symlinks() if link.startswith("/usr/local/bin/")}
    for container in daemonset["containers"] + daemonset["initContainers"]:
        assert container["command"][0] in on_path, container["name"]


def test_copy_sources_exist_after_make_build():
    missing = [source for source in _copies().values() if not (REPO / source).exists()]
    assert not missing, f"{missing} missing: run `make build` first"
    for name in ("wgcni", "wgcni-node"):
        executable = _image_path(f"/usr/local/bin/{name}")
        assert executable.is_file() and os.access(executable, os.X_OK), executable
        # make build's dist/bin/<name> is the same executable the image copies
        assert (DIST / "bin" / name).resolve() == executable.resolve()


@pytest.fixture
def node(tmp_path):
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    original = (REPO / "tests" / "cni" / "data" / "azure-linux.conflist").read_bytes()
    (conf_dir / "10-azure.conflist").write_bytes(original)
    return conf_dir, bin_dir, original


def test_built_hook_installs_the_built_plugin_bundle_like_on_a_node(node, tmp_path):
    """The image's wgcni-node runs install-cni with the image's plugin; the plugin then answers CNI VERSION from the
    node's bin dir (through the bundle symlink), and uninstall-cni restores the conflist."""
    conf_dir, bin_dir, original = node
    image_plugin = tmp_path / "opt" / "wgcni" / "wgcni"  # the image layout, built from dist/ as the COPY does
    shutil.copytree(_image_path(str(BUNDLED_PLUGIN)), image_plugin, symlinks=True)
    hook = _image_path("/usr/local/bin/wgcni-node")
    dirs = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    result = subprocess.run([hook, "install-cni", *dirs, "--plugin", str(image_plugin)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = bin_dir / "wgcni"
    assert installed.is_symlink() and stat.S_IMODE(installed.stat().st_mode) & 0o111
    plugins = json.loads((conf_dir / "10-azure.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["azure-vnet", "wgcni", "portmap"]

    version = subprocess.run([installed], input=json.dumps({"cniVersion": "0.3.0"}), capture_output=True, text=True,
                             env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert version.returncode == 0, version.stdout + version.stderr
    assert "0.3.0" in json.loads(version.stdout)["supportedVersions"]

    result = subprocess.run([hook, "uninstall-cni", *dirs], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (conf_dir / "10-azure.conflist").read_bytes() == original and os.listdir(bin_dir) == []
