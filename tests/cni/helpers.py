"""Helpers for the plugin tests: AKS-shaped inputs at every cniVersion and an in-process CNI invoker.

The conflists in ``data/`` are the ones the Azure CNI release ships (copied from the reference folder so a clone
is self-contained); ``plugin_stdin`` inserts wgcni right after azure-vnet and builds the plugin's stdin the way
libcni does (the plugin's own object with ``name``, ``cniVersion`` and ``prevResult`` injected).
"""

from __future__ import annotations

import io
import json
import pathlib

from cni_plugin.cni import SUPPORTED_VERSIONS, dispatch

DATA = pathlib.Path(__file__).parent / "data"
AKS_CONFLISTS = sorted(DATA.glob("*.conflist"))
VERSIONS = list(SUPPORTED_VERSIONS)
CONTAINER_ID = "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755"
NETNS = "/var/run/netns/cni-8c1b6a2e-5c3e-4f0e-a7a1-0d4b2f7c9e11"
POD_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-7d4b9c6f5-x2x9q;"
            f"K8S_POD_INFRA_CONTAINER_ID={CONTAINER_ID};K8S_POD_UID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


def load_conflist(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


AZURE_CONFLIST = load_conflist(DATA / "azure-linux.conflist")  # the default conflist of an AKS node


def is_dual_stack(path: pathlib.Path) -> bool:
    """AKS's dual-stack overlay conflist hands out an IPv4 and an IPv6 address per pod."""
    return "dualstack" in path.name


def aks_prev_result(version: str, dual_stack: bool = False) -> dict:
    """What azure-vnet (transparent mode) returns, in the shape of ``version`` (azure-cni.md)."""
    ips = [{"version": "4", "address": "10.240.0.65/16", "gateway": "10.240.0.1"}]
    if dual_stack:
        ips.append({"version": "6", "address": "fd00:10:240::41/64", "gateway": "fd00:10:240::1"})
    if not version.startswith("0."):
        ips = [{k: v for k, v in ip.items() if k != "version"} for ip in ips]
    return {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": ""}],
        "ips": ips,
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.240.0.1"}],
        "dns": {"nameservers": ["168.63.129.16"]},
    }


def expected_ips(dual_stack: bool) -> list[str]:
    return ["10.240.0.65", "fd00:10:240::41"] if dual_stack else ["10.240.0.65"]


def wgcni_entry(settings: dict) -> dict:
    return {"type": "wgcni", **settings}


def chained_conflist(conflist: dict, settings: dict) -> dict:
    """The AKS conflist with wgcni inserted right after azure-vnet."""
    plugins = list(conflist["plugins"])
    position = next(i for i, p in enumerate(plugins) if p["type"] == "azure-vnet") + 1
    plugins.insert(position, wgcni_entry(settings))
    return {**conflist, "plugins": plugins}


def plugin_stdin(conflist: dict, version: str, settings: dict, prev_result: dict | None = None,
                 **extra: object) -> bytes:
    """The stdin libcni gives wgcni for ``conflist`` (at ``version``) on one call."""
    chained = chained_conflist(conflist, settings)
    entry = next(p for p in chained["plugins"] if p["type"] == "wgcni")
    conf = {**entry, "name": chained["name"], "cniVersion": version}
    if prev_result is not None:
        conf["prevResult"] = prev_result
    conf.update(extra)
    return json.dumps(conf).encode()


def cni_env(command: str, container_id: str = CONTAINER_ID, ifname: str = "eth0", netns: str = NETNS,
            args: str = POD_ARGS) -> dict:
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"}
    if container_id is not None:
        env["CNI_CONTAINERID"] = container_id
    if ifname is not None:
        env["CNI_IFNAME"] = ifname
    if netns is not None:
        env["CNI_NETNS"] = netns
    if args is not None:
        env["CNI_ARGS"] = args
    return env


class CniCall:
    """The outcome of one in-process call: exit code, parsed stdout (or None when empty), raw stdout."""

    def __init__(self, code: int, raw: str) -> None:
        self.code = code
        self.raw = raw
        self.output = json.loads(raw) if raw.strip() else None

    def error_code(self) -> int:
        assert self.code == 1, self.raw
        assert set(self.output) == {"cniVersion", "code", "msg", "details"}, self.output
        assert isinstance(self.output["msg"], str) and self.output["msg"]
        return self.output["code"]


def invoke(env: dict, stdin: bytes) -> CniCall:
    stdout = io.StringIO()
    code = dispatch(env, io.BytesIO(stdin), stdout)
    return CniCall(code, stdout.getvalue())


def record_files(state_dir: str) -> dict[str, bytes]:
    """Every file below ``<stateDir>/pods`` except the lock, with its content: the store's whole state."""
    root = pathlib.Path(state_dir) / "pods"
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}
