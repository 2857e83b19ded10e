"""Authentication, RBAC and admission as the test API server enforces them with conf/rbac.yaml: the requests a
compromised hook would send (relabel, taint, cordon its Node; write another node's objects; delete) are refused, the
one write the hook needs on its Node passes, and the CEL engine evaluates what the policy language offers."""

from __future__ import annotations

import copy
import json
import pathlib
import time

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from node_hook.cluster import api_client_for_url
from wgcni_lab.apiserver.server import ApiServer

CONF = pathlib.Path(__file__).parents[2] / "conf"
CRD = yaml.safe_load((CONF / "crd.yaml").read_text())
RBAC = [doc for doc in yaml.safe_load_all((CONF / "rbac.yaml").read_text()) if doc]
GROUP, VERSION, PLURAL = "wgcni.io", "v1alpha1", "wireguardnodes"
KEY_ANNOTATION = "wgcni.io/public-key"
OWN_NODE_ONLY = "wgcni-node may only write the Node and the WireguardNode of the node it runs on"
ONLY_THE_KEY = "on its Node, wgcni-node may change only the wgcni.io/public-key annotation"


@pytest.fixture
def server():
    with ApiServer(crds=[CRD], manifests=RBAC) as api_server:
        yield api_server


def clients(server, token):
    api_client = api_client_for_url(server.url, token, ca_file=server.ca_file)
    return client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)


@pytest.fixture
def admin(server):
    return clients(server, server.admin_token)


@pytest.fixture
def nodes(server, admin):
    """node-a and node-b (node-a tainted by the operator and labelled), each with its WireguardNode."""
    core, custom = admin
    made = {}
    for name in ("node-a", "node-b"):
        node = core.create_node(client.V1Node(
            metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/os": "linux"},
                                         annotations={"node.alpha.kubernetes.io/ttl": "0"}),
            spec=client.V1NodeSpec(taints=[client.V1Taint(key="pool", value="gpu", effect="NoSchedule")])))
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wireguard_node(name, name, node.metadata.uid))
        made[name] = node
    return made


def wireguard_node(name, owner, uid):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WireguardNode",
            "metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": owner,
                                                            "uid": uid}]}}


@pytest.fixture
def hook_a(server, nodes):
    """What node-a's hook holds: wgcni-node's service-account token, bound to node-a."""
    return clients(server, server.node_token("node-a"))


def refused(call, code=403, message=""):
    with pytest.raises(ApiException) as raised:
        call()
    assert raised.value.status == code, raised.value.body
    text = json.loads(raised.value.body)["message"]
    assert message in text, text
    return text


def test_the_hooks_own_writes_pass(server, hook_a, nodes):
    core, custom = hook_a
    patched = core.patch_node("node-a", {"metadata": {"annotations": {KEY_ANNOTATION: "KEY"}}})
    assert patched.metadata.annotations[KEY_ANNOTATION] == "KEY"
    own = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a")
    own["status"] = {"publicKey": "", "encryption": "Unavailable"}
    custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-a", own)
    core.patch_node("node-a", {"metadata": {"annotations": {KEY_ANNOTATION: None}}})
    assert [node.metadata.name for node in core.list_node(field_selector="metadata.name=node-a").items] == ["node-a"]
    assert len(custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]) == 2


@pytest.mark.parametrize("patch", [
    {"metadata": {"labels": {"wgcni.io/wireguard": "disabled"}}},  # opting itself out is the operator's call
    {"metadata": {"labels": {"kubernetes.io/os": None}}},
    {"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": "30", KEY_ANNOTATION: "KEY"}}},
    {"metadata": {"finalizers": ["example.com/keep"]}},
    {"spec": {"unschedulable": True}},  # cordon
    {"spec": {"taints": None}},  # untaint to attract pods
    {"spec": {"taints": [{"key": "pool", "value": "gpu", "effect": "NoSchedule"},
                         {"key": "evil", "effect": "NoExecute"}]}},
    {"spec": {"podCIDR": "10.244.9.0/24"}},
], ids=["opt-out-label", "remove-label", "other-annotation", "finalizer", "cordon", "untaint", "taint", "spec"])
def test_on_its_own_node_a_hook_may_change_nothing_but_the_key_annotation(server, hook_a, admin, patch):
    core, _ = hook_a
    before = admin[0].read_node("node-a")
    refused(lambda: core.patch_node("node-a", patch), 403, ONLY_THE_KEY)
    after = admin[0].read_node("node-a")
    assert after.metadata.resource_version == before.metadata.resource_version


def test_a_hook_cannot_write_another_nodes_objects(server, hook_a, nodes):
    core, custom = hook_a
    refused(lambda: core.patch_node("node-b", {"metadata": {"annotations": {KEY_ANNOTATION: "KEY"}}}), 403,
            OWN_NODE_ONLY)
    other = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "node-b")
    other["status"] = {"publicKey": "", "endpoint": {"address": "10.0.0.66", "port": 51820}}
    refused(lambda: custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-b", other), 403,
            OWN_NODE_ONLY)


def test_a_hook_creates_its_object_only_named_after_and_owned_by_its_node(server, admin, nodes):
    admin[1].delete_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a")
    admin[1].delete_cluster_custom_object(GROUP, VERSION, PLURAL, "node-b")
    _, custom = clients(server, server.node_token("node-a"))
    uid_a, uid_b = nodes["node-a"].metadata.uid, nodes["node-b"].metadata.uid
    refused(lambda: custom.create_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                        wireguard_node("node-b", "node-b", uid_b)), 403, OWN_NODE_ONLY)
    refused(lambda: custom.create_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                        wireguard_node("node-a", "node-b", uid_b)), 403,
            "wgcni-node creates its WireguardNode owned by its own Node")
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wireguard_node("node-a", "node-a", uid_a))


def test_rbac_refuses_what_the_role_does_not_grant(server, hook_a):
    core, custom = hook_a
    message = refused(lambda: custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "node-b"))
    assert message == (
        'wireguardnodes.wgcni.io "node-b" is forbidden: User "system:serviceaccount:kube-system:wgcni-node" '
        'cannot delete resource "wireguardnodes" in API group "wgcni.io" at the cluster scope')
    refused(lambda: core.delete_node("node-a"))
    refused(lambda: core.patch_node_status("node-a", {"status": {"addresses": []}}))  # nodes/status: not granted
    refused(lambda: custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a", {"metadata": {
        "labels": {"x": "y"}}}))  # the main resource: only create is granted, updates go through /status
    refused(lambda: core.list_namespaced_config_map("kube-system"))
    refused(lambda: core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="node-c"))))


def test_tokens_authenticate_only_while_valid_and_bound_to_a_live_node(server, admin, nodes):
    core, _ = admin
    refused(lambda: clients(server, "not-a-token")[0].list_node(), 401)
    anonymous = client.CoreV1Api(api_client_for_url(server.url, ca_file=server.ca_file))
    refused(lambda: anonymous.list_node(), 403, 'User "system:anonymous" cannot list resource "nodes"')
    short = clients(server, server.node_token("node-a", ttl=0.5))[0]
    short.list_node()
    time.sleep(0.6)
    refused(lambda: short.list_node(), 401)
    bound = clients(server, server.node_token("node-b"))[0]
    bound.list_node()
    core.delete_node("node-b")
    refused(lambda: bound.list_node(), 401)  # its Node is gone: so is the token
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="node-b")))
    refused(lambda: bound.list_node(), 401)  # a new Node of the same name has another uid


def test_a_token_without_a_node_reads_but_writes_nothing(server, nodes):
    token = server.authenticator.service_account_token("kube-system", "wgcni-node")  # no node binding
    core, _ = clients(server, token)
    core.read_node("node-a")
    refused(lambda: core.patch_node("node-a", {"metadata": {"annotations": {KEY_ANNOTATION: "KEY"}}}), 403,
            OWN_NODE_ONLY)


def test_the_administrator_is_not_restricted_by_the_policy(admin, nodes):
    core, _ = admin
    core.patch_node("node-a", {"metadata": {"labels": {"wgcni.io/wireguard": "disabled"}},
                               "spec": {"unschedulable": True}})


def test_always_allow_mode_skips_rbac_but_not_admission():
    with ApiServer(crds=[CRD], manifests=RBAC, authorization_mode="AlwaysAllow") as server:
        admin_core, _ = clients(server, server.admin_token)
        admin_core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="node-a")))
        core, _ = clients(server, server.node_token("node-a"))
        core.create_namespaced_config_map("default", config_map("x", {}))  # RBAC would refuse it
        refused(lambda: core.patch_node("node-a", {"spec": {"unschedulable": True}}), 403, ONLY_THE_KEY)
        anonymous = client.CoreV1Api(api_client_for_url(server.url, ca_file=server.ca_file))
        assert [node.metadata.name for node in anonymous.list_node().items] == ["node-a"]


def policy(name, validations, variables=(), failure_policy="Fail", actions=("Deny",)):
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name}, "spec": {
             "failurePolicy": failure_policy, "variables": list(variables), "validations": validations,
             "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                     "resources": ["configmaps"], "operations": ["CREATE"]}]}}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": name}, "spec": {"policyName": name, "validationActions": list(actions)}},
    ]


def config_map(name, data):
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, namespace="default"), data=data)


def test_cel_variables_message_expressions_and_failure_policies(server, admin):
    core, _ = admin
    server.create_objects(policy("size", [{
        "expression": "variables.keys.size() <= 2 && variables.keys.all(k, k.startsWith('a'))",
        "messageExpression": "string(variables.keys.size()) + ' keys from ' + request.userInfo.username",
        "reason": "Forbidden"}], variables=[{"name": "keys", "expression": "object.data.map(k, k)"}]))
    core.create_namespaced_config_map("default", config_map("ok", {"a1": "x", "a2": "y"}))
    error = refused(lambda: core.create_namespaced_config_map("default", config_map("no", {"b": "x"})), 403)
    assert error.endswith("denied request: 1 keys from kubernetes-admin")
    refused(lambda: core.create_namespaced_config_map("default", config_map("no", {"a": "1", "ab": "2", "ac": ""})))


def test_an_expression_that_does_not_compile_denies_under_fail_and_not_under_ignore(server, admin):
    core, _ = admin
    broken = [{"expression": "object.data.size( >", "message": "never shown"}]
    server.create_objects(policy("broken-fail", copy.deepcopy(broken)))
    error = refused(lambda: core.create_namespaced_config_map("default", config_map("x", {"a": "b"})), 422)
    assert "could not be evaluated" in error
    server.store.delete(server.store.type_of("validatingadmissionpolicybindings.admissionregistration.k8s.io"),
                        "broken-fail", {})
    server.create_objects(policy("broken-ignore", copy.deepcopy(broken), failure_policy="Ignore"))
    server.create_objects(policy("warn-only", [{"expression": "false"}], actions=("Warn",)))
    core.create_namespaced_config_map("default", config_map("x", {"a": "b"}))
