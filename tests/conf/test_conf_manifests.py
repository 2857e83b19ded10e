"""Offline validation of conf/: every manifest against the Kubernetes schemas of the AKS versions, the CRD's own schema
against sample objects, and the consistency between the DaemonSet, the ConfigMap, the hook's settings and the installer.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from node_hook.cluster import GROUP, KIND, PLURAL, VERSION, published_status
from node_hook.config import SETTINGS_DOC, settings_from_mapping
from node_hook.install.settings import DEFAULT_BIN_DIR, DEFAULT_CONF_DIR
from node_hook.model import LocalAnnouncement

CONF = Path(__file__).parents[2] / "conf"
# The Kubernetes minor versions AKS supports (GA) at the time of writing; move with the AKS release calendar.
AKS_KUBERNETES_VERSIONS = ("1.34", "1.35", "1.36")
NAMESPACE = "kube-system"
SERVICE_ACCOUNT = "wgcni-node"


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


MANIFEST_FILES = sorted(path for path in CONF.glob("*.yaml") if path.name != "kustomization.yaml")
MANIFESTS = [(path, document) for path in MANIFEST_FILES for document in _documents(path)]


def _by_kind(kind: str) -> list[dict]:
    return [document for _, document in MANIFESTS if document["kind"] == kind]


def _one(kind: str) -> dict:
    (document,) = _by_kind(kind)
    return document


@pytest.mark.parametrize("version", AKS_KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path, document", MANIFESTS,
                         ids=[f"{path.name}:{doc['kind']}/{doc['metadata']['name']}" for path, doc in MANIFESTS])
def test_manifest_is_valid_for_aks_kubernetes(path, document, version):
    kubernetes_validate.validate(document, version, strict=True)  # strict: unknown fields are errors


def test_the_validator_rejects_a_broken_daemonset():
    """The check above can fail: a misspelt field and a wrong type are both caught."""
    broken = yaml.safe_load(yaml.safe_dump(_one("DaemonSet")))
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, AKS_KUBERNETES_VERSIONS[0], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(_one("DaemonSet")))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9820"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, AKS_KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((CONF / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(path.name for path in MANIFEST_FILES)
    images = {image["name"] for image in kustomization["images"]}
    daemonset = _one("DaemonSet")["spec"]["template"]["spec"]
    assert {c["image"].split(":")[0] for c in daemonset["containers"] + daemonset["initContainers"]} == images


def test_namespaced_objects_live_in_kube_system():
    for _, document in MANIFESTS:
        if document["kind"] in ("ServiceAccount", "ConfigMap", "DaemonSet", "Role", "RoleBinding"):
            assert document["metadata"]["namespace"] == NAMESPACE, document["kind"]


# --- the CRD ---------------------------------------------------------------------------------------------------------

def _crd_schema() -> dict:
    crd = _one("CustomResourceDefinition")
    assert crd["spec"]["group"] == GROUP and crd["spec"]["names"]["kind"] == KIND
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    return version["schema"]["openAPIV3Schema"]


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _rfc3339(value: object) -> bool:
    """RFC 3339 date-time as the API server checks it (jsonschema needs an extra package for this)."""
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.fromisoformat(value.replace("Z", "+00:00"))  # raises for a month 13 and the like
    return True


def _validator() -> jsonschema.Draft4Validator:
    # Kubernetes' structural OpenAPI v3 schemas are JSON Schema draft 4 plus x-kubernetes-* extensions (ignored here).
    return jsonschema.Draft4Validator(_crd_schema(), format_checker=_FORMATS)


def _every_schema_node(schema: dict, where: str = "openAPIV3Schema"):
    yield where, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _every_schema_node(child, f"{where}.{name}")
    if "items" in schema:
        yield from _every_schema_node(schema["items"], f"{where}[]")


def test_crd_schema_is_structural():
    """The API server rejects a CRD whose schema nodes do not all declare a type."""
    for where, node in _every_schema_node(_crd_schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"), where


def _sample(status: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": "aks-nodepool1-12345678-vmss000000"}, "status": status}


KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def _published(**changes) -> dict:
    announcement = LocalAnnouncement(
        name="aks-nodepool1-12345678-vmss000000", public_key=KEY, endpoint_ip="10.240.0.4", endpoint_port=51820,
        node_ips=frozenset({"10.240.0.4", "fd00::4"}),
        pod_ips=frozenset({"10.240.0.5", "10.240.0.6", "10.240.0.7", "10.240.0.64", "fd00::5"}), mtu=1340, ready=True,
        message="dataplane programmed")
    fields = {**announcement.__dict__, **changes}
    return published_status(LocalAnnouncement(**fields), opted_out=False, pod_ips_changed_at=1_790_000_000.123456,
                            previous=None, now=1_790_000_000.0)


@pytest.mark.parametrize("status", [
    _published(),
    _published(public_key="", endpoint_ip=None, pod_ips=frozenset(), ready=False, message="no WireGuard on this node"),
    published_status(LocalAnnouncement(name="n", public_key=KEY, endpoint_ip="10.240.0.4", endpoint_port=51820,
                                       node_ips=frozenset(), pod_ips=frozenset(), mtu=0, ready=False, message=""),
                     opted_out=True, pod_ips_changed_at=0.0, previous=None, now=0.0),
    {},
], ids=["published-by-cluster.py", "no-wireguard", "opted-out", "empty"])
def test_crd_accepts_what_the_sync_layer_publishes(status):
    _validator().validate(_sample(status))


@pytest.mark.parametrize("change, path", [
    ({"publicKey": "not-a-key"}, "publicKey"),
    ({"publicKey": KEY[:-2] + "B="}, "publicKey"),  # 32 bytes need the last character from the restricted set
    ({"publicKeyPrefix": KEY[:9]}, "publicKeyPrefix"),
    ({"encryption": "IPsec"}, "encryption"),
    ({"endpoint": {"address": "10.240.0.4", "port": 70000}}, "port"),
    ({"endpoint": {"address": "10.240.0.4", "port": "51820"}}, "port"),
    ({"podIPCount": -1}, "podIPCount"),
    ({"podIPsChangedAt": "yesterday"}, "podIPsChangedAt"),
    ({"podIPsChangedAt": "2026-13-01T00:00:00Z"}, "podIPsChangedAt"),
    ({"conditions": [{"type": "Ready"}]}, "status"),
    ({"conditions": [{"type": "Ready", "status": "Yes"}]}, "status"),
    ({"nodeIPs": "10.240.0.4"}, "nodeIPs"),
    ({"mtu": 70000}, "mtu"),
], ids=["bad-key", "non-canonical-key", "long-prefix", "encryption-enum", "port-range", "port-type", "negative-count",
        "bad-time", "bad-month", "condition-without-status", "condition-status-enum", "node-ips-not-list", "mtu-range"])
def test_crd_rejects_invalid_objects(change, path):
    errors = list(_validator().iter_errors(_sample({**_published(), **change})))
    assert errors, f"{change} was accepted"
    assert any(path in "/".join(map(str, error.absolute_path)) or path in error.message for error in errors)


# --- the ConfigMap against the hook's settings ------------------------------------------------------------------------

def _config_text() -> str:
    return _one("ConfigMap")["data"]["config.yaml"]


def test_configmap_holds_every_setting_with_its_default_and_a_comment():
    text = _config_text()
    raw = yaml.safe_load(text)
    settings_from_mapping(raw)  # the hook accepts it
    documented = {key: default for key, default, _ in SETTINGS_DOC}
    assert set(raw) == set(documented) - {"nodeName"}  # the node name comes from the node itself
    deliberate = {"metricsAddress": "0.0.0.0:9820"}  # serves the DaemonSet's probes
    for key, value in raw.items():
        expected = deliberate.get(key, documented[key])
        assert value == (list(expected) if isinstance(expected, tuple) else expected), key
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[A-Za-z]+:", line):
            assert lines[index - 1].lstrip().startswith("#"), f"{line!r} has no comment above it"
    assert "nodeName" in text  # explained in a comment


# --- the DaemonSet against the ConfigMap, the installer and the RBAC ------------------------------------------------

def _pod() -> dict:
    return _one("DaemonSet")["spec"]["template"]["spec"]


def _container(name: str) -> dict:
    pod = _pod()
    (container,) = [c for c in pod["containers"] + pod["initContainers"] if c["name"] == name]
    return container


def _host_path(container: dict, mount_path: str) -> str:
    volumes = {volume["name"]: volume for volume in _pod()["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    return volumes[mount["name"]]["hostPath"]["path"]


def test_daemonset_runs_everywhere_as_a_node_critical_host_network_pod():
    pod = _pod()
    assert pod["hostNetwork"] is True and not pod.get("hostPID")
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert any(sa["metadata"]["name"] == SERVICE_ACCOUNT and sa["metadata"]["namespace"] == NAMESPACE
               for sa in _by_kind("ServiceAccount"))
    env = {e["name"]: e for e in _container("wgcni-node")["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_install_containers_use_the_installer_defaults_and_the_hook_config():
    config = settings_from_mapping(yaml.safe_load(_config_text()))
    configmap_name = _one("ConfigMap")["metadata"]["name"]
    volumes = {volume["name"]: volume for volume in _pod()["volumes"]}
    for name, mode in (("install-cni", "--wait"), ("install-cni-watch", "--watch")):
        container = _container(name)
        command = container["command"]
        assert command[:2] == ["wgcni-node", "install-cni"] and mode in command
        config_path = Path(command[command.index("--config") + 1])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        assert volumes[mount["name"]]["configMap"]["name"] == configmap_name
        assert "--conf-dir" not in command and "--bin-dir" not in command and "--plugin" not in command
        assert _host_path(container, str(DEFAULT_CONF_DIR)) == str(DEFAULT_CONF_DIR)
        assert _host_path(container, str(DEFAULT_BIN_DIR)) == str(DEFAULT_BIN_DIR)
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert not container["securityContext"]["privileged"]
    hook = _container("wgcni-node")
    assert hook["command"][:2] == ["wgcni-node", "run"]
    # The plugin (host) and the hook (container) must see the same state dir and socket.
    assert _host_path(hook, str(config.state_dir)) == str(config.state_dir)
    assert _host_path(hook, str(config.socket.parent)) == str(config.socket.parent)
    assert _host_path(hook, "/var/run/wireguard") == "/var/run/wireguard"
    assert _host_path(hook, "/lib/modules") == "/lib/modules"


def test_probes_use_the_metrics_port_of_the_config():
    port = int(yaml.safe_load(_config_text())["metricsAddress"].rsplit(":", 1)[1])
    hook = _container("wgcni-node")
    ports = {p["name"]: p["containerPort"] for p in hook["ports"]}
    assert ports["metrics"] == port
    assert hook["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert hook["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert hook[probe]["httpGet"]["port"] == "metrics"


def test_rbac_binds_the_daemonset_service_account():
    bindings = _by_kind("ClusterRoleBinding") + _by_kind("RoleBinding")
    assert bindings
    subjects = [s for binding in bindings for s in binding["subjects"]]
    assert {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE} in subjects
    assert all(s.get("namespace") == NAMESPACE and s["name"] == SERVICE_ACCOUNT for s in subjects)
