"""Helpers of the real-runtime tests: the invocation journal, AKS-shaped conflists, the
built plugin's location and the libcni driver build.

The runtime and the reference plugins always run inside a "node" network namespace, never the host's:
`ptp` enables IP forwarding and `portmap` adds iptables chains in the namespace they run in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from wgcni_lab.buildcache import cached_build, content_key

REPO = Path(__file__).resolve().parents[2]
BUILT_PLUGIN = REPO / "dist" / "bin" / "wgcni"
DRIVER_SOURCE = Path(__file__).resolve().parent / "libcni_driver" / "main.go"
GOPATH = Path("/usr/share/gocode")
NETWORK = "azure"


class Journal:
    """Reads what the journaling wrapper recorded about each plugin invocation."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, container_id: str | None = None) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line.strip()]
        return [entry for entry in entries if container_id is None or entry["containerID"] == container_id]

    def commands(self, container_id: str) -> list[str]:
        return [entry["command"] for entry in self.entries(container_id)]


WRAPPER = '''\
#!{python} -S
"""Journaling wrapper: runs {real} unchanged (same env, stdin, stdout, exit status) and appends one JSON
line per invocation to {journal}, so a test can see exactly how the runtime called the plugin."""
import fcntl, json, os, subprocess, sys
data = sys.stdin.buffer.read()
try:
    conf = json.loads(data)
except ValueError:
    conf = {{}}
done = subprocess.run([{real!r}], input=data, capture_output=True)
entry = {{
    "command": os.environ.get("CNI_COMMAND"), "containerID": os.environ.get("CNI_CONTAINERID"),
    "netns": os.environ.get("CNI_NETNS"), "ifname": os.environ.get("CNI_IFNAME"),
    "args": os.environ.get("CNI_ARGS"), "cniVersion": conf.get("cniVersion") if isinstance(conf, dict) else None,
    "prevResult": isinstance(conf, dict) and "prevResult" in conf,
    "runtimeConfig": conf.get("runtimeConfig") if isinstance(conf, dict) else None,
    "exit": done.returncode, "stdout": done.stdout.decode(errors="replace"),
}}
with open({journal!r}, "a") as journal:
    fcntl.flock(journal, fcntl.LOCK_EX)
    journal.write(json.dumps(entry) + "\\n")
sys.stdout.buffer.write(done.stdout)
sys.stderr.buffer.write(done.stderr)
sys.exit(done.returncode)
'''


def journaling_plugin(directory: Path, real: Path, journal_path: Path) -> Path:
    """Write a wrapper executable that journals each call and then runs `real`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "wgcni-journaled"
    wrapper.write_text(WRAPPER.format(python=sys.executable, real=str(real), journal=str(journal_path)))
    wrapper.chmod(0o755)
    return wrapper


def plugin_settings(base: Path) -> dict:
    return {
        "stateDir": str(base / "wgcni-state"),
        "hookSocket": str(base / "hook.sock"),
        "logFile": str(base / "wgcni.log"),
        "logLevel": "debug",
    }


def record_path(settings: dict, container_id: str, ifname: str = "eth0", network: str = NETWORK) -> Path:
    return Path(settings["stateDir"]) / "pods" / network / f"{container_id}@{ifname}.json"


def aks_shaped_conflist(cni_version: str, settings: dict, subnet: str, ipam_data_dir: Path | None = None) -> dict:
    """Shaped like AKS's azure-linux conflist: name "azure", the given cniVersion, azure-vnet (here ptp +
    host-local, which also give each pod a veth and a /32 host route), then wgcni, then portmap."""
    ipam: dict = {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}
    if ipam_data_dir is not None:
        ipam["dataDir"] = str(ipam_data_dir)
    return {
        "cniVersion": cni_version,
        "name": NETWORK,
        "plugins": [
            {"type": "ptp", "ipMasq": False, "mtu": 1500, "ipam": ipam},
            {"type": "wgcni", **settings},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }



def build_libcni_driver() -> Path:
    """The libcni driver, built once per machine and source version with Debian's Go and libcni."""
    go_version = subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout
    key = content_key([DRIVER_SOURCE, go_version])

    def build(out: Path) -> None:
        source_dir = out / "src"
        source_dir.mkdir()
        shutil.copy(DRIVER_SOURCE, source_dir / "main.go")
        env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOCACHE=str(out / "gocache"),
                   GOFLAGS="", CGO_ENABLED="0")
        done = subprocess.run(["go", "build", "-o", str(out / "libcni-driver"), "."], cwd=source_dir, env=env,
                              capture_output=True, text=True)
        shutil.rmtree(out / "gocache", ignore_errors=True)
        shutil.rmtree(source_dir, ignore_errors=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the libcni driver failed:\n{done.stderr}")

    return cached_build("libcni-driver", key, build) / "libcni-driver"
