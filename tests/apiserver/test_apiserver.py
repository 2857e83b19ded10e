"""The test API server against the official kubernetes client's expectations: CRUD, 409/404 Status objects,
list and watch with resourceVersion, bookmarks, 410 Gone, patches, owner-reference garbage collection, faults."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from node_hook.cluster import api_client_for_url
from wgcni_lab.apiserver.server import ApiServer, NamespacedListener
from wgcni_lab.apiserver.tls import TEMPORARY_PREFIX, ServingCertificates
from wgcni_lab.harness.netns import Namespaces
from wgcni_lab.harness.polling import TIME_SCALE, wait_until

CRD = yaml.safe_load((pathlib.Path(__file__).parents[2] / "conf" / "crd.yaml").read_text())
GROUP, VERSION, PLURAL = "wgcni.io", "v1alpha1", "wireguardnodes"


@pytest.fixture
def server():
    with ApiServer(crds=[CRD], bookmark_interval=0.2, history_window=50) as api_server:
        yield api_server


@pytest.fixture
def api(server):
    api_client = api_client_for_url(server.url, server.admin_token, ca_file=server.ca_file)
    try:
        yield api_client
    finally:
        api_client.close()


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture
def custom(api):
    return client.CustomObjectsApi(api)


def make_node(core, name, labels=None):
    return core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels)))


def wg_object(name, owner=None):
    metadata = {"name": name}
    if owner is not None:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": owner.metadata.name,
                                        "uid": owner.metadata.uid}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WireguardNode", "metadata": metadata,
            "status": {"publicKey": "ignored on create"}}


def test_node_create_get_list_and_resource_versions_increase(core):
    first = make_node(core, "node-a", {"role": "x"})
    second = make_node(core, "node-b")
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert first.metadata.uid and first.metadata.creation_timestamp
    assert core.read_node("node-a").metadata.labels == {"role": "x"}
    listing = core.list_node()
    assert [n.metadata.name for n in listing.items] == ["node-a", "node-b"]
    assert listing.metadata.resource_version == second.metadata.resource_version
    assert [n.metadata.name for n in core.list_node(label_selector="role=x").items] == ["node-a"]
    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name=node-b").items] == ["node-b"]


def test_missing_object_is_404_with_status(core, custom):
    with pytest.raises(ApiException) as raised:
        core.read_node("nope")
    assert raised.value.status == 404
    assert '"reason": "NotFound"' in raised.value.body or '"reason":"NotFound"' in raised.value.body
    with pytest.raises(ApiException) as raised:
        custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "nope")
    assert raised.value.status == 404


def test_create_twice_is_409_already_exists(core):
    make_node(core, "node-a")
    with pytest.raises(ApiException) as raised:
        make_node(core, "node-a")
    assert raised.value.status == 409 and "AlreadyExists" in raised.value.body


def test_custom_resource_status_subresource_and_stale_update_conflict(custom):
    created = custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("node-a"))
    assert "status" not in created, "status is dropped on create when the status subresource is on"
    created["status"] = {"publicKey": "", "podIPCount": 0}
    updated = custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-a", created)
    assert updated["status"] == {"publicKey": "", "podIPCount": 0}
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    # created still carries the old resourceVersion: a stale write
    created["status"] = {"publicKey": "", "podIPCount": 7}
    with pytest.raises(ApiException) as raised:
        custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-a", created)
    assert raised.value.status == 409 and "Conflict" in raised.value.body
    # writing status through the main resource does not change it
    updated["status"] = {"publicKey": "", "podIPCount": 99}
    after = custom.replace_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a", updated)
    assert after["status"]["podIPCount"] == 0


def test_merge_patch_with_resource_version_precondition(custom):
    created = custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("node-a"))
    patched = custom.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, "node-a",
        {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "status": {"mtu": 1340}})
    assert patched["status"] == {"mtu": 1340}
    with pytest.raises(ApiException) as raised:
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, "node-a",
            {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "status": {"mtu": 1}})
    assert raised.value.status == 409


def test_node_annotation_strategic_and_json_patch(core):
    make_node(core, "node-a")
    core.patch_node("node-a", {"metadata": {"annotations": {"wgcni.io/public-key": "abc"}}})
    assert core.read_node("node-a").metadata.annotations == {"wgcni.io/public-key": "abc"}
    core.patch_node("node-a", [{"op": "replace", "path": "/metadata/annotations/wgcni.io~1public-key",
                                "value": "def"}])
    assert core.read_node("node-a").metadata.annotations == {"wgcni.io/public-key": "def"}
    core.patch_node("node-a", {"metadata": {"annotations": {"wgcni.io/public-key": None}}})
    assert not core.read_node("node-a").metadata.annotations
    with pytest.raises(ApiException) as raised:
        core.patch_node("node-a", [{"op": "test", "path": "/metadata/name", "value": "other"}])
    assert raised.value.status == 422


@pytest.fixture
def lagging_gc():
    """A server whose garbage collector lags 0.3 s behind deletions, as a loaded real one does."""
    with ApiServer(crds=[CRD], gc_delay=0.3) as api_server:
        api_client = api_client_for_url(api_server.url, api_server.admin_token, ca_file=api_server.ca_file)
        yield client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        api_client.close()


def names_of(custom):
    return [o["metadata"]["name"] for o in custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]]


def test_deleting_node_garbage_collects_owned_object_asynchronously(lagging_gc):
    core, custom = lagging_gc
    node = make_node(core, "node-a")
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("node-a", owner=node))
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("unowned"))
    core.delete_node("node-a")
    assert names_of(custom) == ["node-a", "unowned"], "the dependent outlives its owner's DELETE for a while"
    wait_until(lambda: names_of(custom) == ["unowned"], what="the garbage collector")


def test_object_whose_owner_is_gone_is_garbage_collected(lagging_gc):
    core, custom = lagging_gc
    node = make_node(core, "node-a")
    core.delete_node("node-a")
    created = custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("node-a", owner=node))
    assert created["metadata"]["name"] == "node-a"
    wait_until(lambda: names_of(custom) == [], what="the garbage collector")


def test_lists_are_paginated_with_continue_tokens_at_one_resource_version(server, core, custom):
    for index in range(7):
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object(f"n{index}"))
    first = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=3)
    assert [o["metadata"]["name"] for o in first["items"]] == ["n0", "n1", "n2"]
    assert first["metadata"]["remainingItemCount"] == 4
    custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "n5")  # after the first page: still listed
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("n9"))  # not listed
    second = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=3, _continue=first["metadata"]["continue"])
    third = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=3, _continue=second["metadata"]["continue"])
    assert [o["metadata"]["name"] for o in second["items"] + third["items"]] == ["n3", "n4", "n5", "n6"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert "continue" not in third["metadata"]
    everything = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=2, resource_version="0")
    assert len(everything["items"]) == 7 and "continue" not in everything["metadata"], "rv=0: the cache, whole"


def test_an_expired_continue_token_is_410(server, custom):
    for index in range(3):
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object(f"n{index}"))
    first = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("later"))
    server.compact()  # etcd compacted past the first page's revision
    with pytest.raises(ApiException) as raised:
        custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1, _continue=first["metadata"]["continue"])
    assert raised.value.status == 410 and json.loads(raised.value.body)["reason"] == "Expired"


def test_429_carries_retry_after(server, core):
    """(A GET would not show it: urllib3, under the client, retries idempotent requests after Retry-After.)"""
    server.fail_next(1, code=429, retry_after=7, methods={"POST"})
    with pytest.raises(ApiException) as raised:
        make_node(core, "node-a")
    assert raised.value.status == 429 and raised.value.headers["Retry-After"] == "7"
    assert json.loads(raised.value.body)["details"]["retryAfterSeconds"] == 7
    make_node(core, "node-a")


def test_list_then_watch_from_resource_version_sees_only_later_changes(core, custom):
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("before"))
    listing = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("after"))
    make_node(core, "a-node-is-another-type")
    custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "before")
    events = []
    for event in watch.Watch().stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                      resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=1):
        events.append((event["type"], event["object"]["metadata"]["name"]))
    assert events == [("ADDED", "after"), ("DELETED", "before")]


def test_watch_without_resource_version_starts_with_current_state_then_live_events(core):
    make_node(core, "node-a")
    stream = watch.Watch()
    seen = []

    def create_later():
        time.sleep(0.2)
        make_node(core, "node-b")

    writer = threading.Thread(target=create_later)
    writer.start()
    for event in stream.stream(core.list_node, timeout_seconds=5):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            stream.stop()
    writer.join()
    assert seen == [("ADDED", "node-a"), ("ADDED", "node-b")]


def test_bookmarks_carry_the_current_resource_version(core, custom):
    listing = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    make_node(core, "unrelated")  # advances the global resourceVersion without a matching event
    current = core.read_node("unrelated").metadata.resource_version
    stream = watch.Watch()
    for event in stream.stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                               resource_version=listing["metadata"]["resourceVersion"],
                               allow_watch_bookmarks=True, timeout_seconds=5):
        assert event["type"] == "BOOKMARK"
        assert event["raw_object"]["metadata"]["resourceVersion"] == current
        stream.stop()
    assert stream.resource_version == current


def test_watch_from_compacted_version_gets_410_error_event(core):
    old = make_node(core, "node-a").metadata.resource_version
    for index in range(60):  # history_window=50
        core.patch_node("node-a", {"metadata": {"labels": {"step": str(index)}}})
    with pytest.raises(ApiException) as raised:
        for _ in watch.Watch().stream(core.list_node, resource_version=old, timeout_seconds=1):
            pass
    assert raised.value.status == 410


def test_exact_list_at_old_version_rebuilds_state_or_is_gone(server, core):
    first = make_node(core, "node-a")
    make_node(core, "node-b")
    core.delete_node("node-a")
    past = core.list_node(resource_version=first.metadata.resource_version, resource_version_match="Exact")
    assert [n.metadata.name for n in past.items] == ["node-a"]
    assert past.metadata.resource_version == first.metadata.resource_version
    core.patch_node("node-b", {"metadata": {"labels": {"x": "y"}}})
    core.list_node()  # still fine
    server.compact()  # forgets the history: the same exact list is now 410
    with pytest.raises(ApiException) as raised:
        core.list_node(resource_version=first.metadata.resource_version, resource_version_match="Exact")
    assert raised.value.status == 410


def test_injected_faults_then_recovery(server, core):
    server.fail_next(2, code=500, methods={"GET"})
    for _ in range(2):
        with pytest.raises(ApiException) as raised:
            core.list_node()
        assert raised.value.status == 500
    assert core.list_node().items == []
    server.fail_next(1, code=409, methods={"POST"}, path_contains="/nodes")
    with pytest.raises(ApiException) as raised:
        make_node(core, "node-a")
    assert raised.value.status == 409
    make_node(core, "node-a")


def test_cut_watch_breaks_the_stream_mid_way(server, core):
    errors = []
    started = threading.Event()

    def consume():
        try:
            for _ in watch.Watch().stream(core.list_node, resource_version="1", allow_watch_bookmarks=True,
                                          timeout_seconds=30):
                started.set()
        except Exception as error:  # noqa: BLE001 - the test records what the client raises
            errors.append(error)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(5)
    server.cut_watches()
    consumer.join(5)
    assert not consumer.is_alive()
    assert errors, "a cut stream must surface as an error, not as a clean end"


def test_restart_keeps_objects_and_compacts_history(server, core):
    node = make_node(core, "node-a")
    make_node(core, "node-b")
    server.restart(downtime=0.1)
    assert core.read_node("node-a").metadata.uid == node.metadata.uid
    with pytest.raises(ApiException) as raised:
        for _ in watch.Watch().stream(core.list_node, resource_version=node.metadata.resource_version,
                                      timeout_seconds=1):
            pass
    assert raised.value.status == 410
    assert server.open_watches() == 0


def test_delete_with_stale_precondition_is_409(core):
    node = make_node(core, "node-a")
    core.patch_node("node-a", {"metadata": {"labels": {"x": "y"}}})
    with pytest.raises(ApiException) as raised:
        core.delete_node("node-a", body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(resource_version=node.metadata.resource_version)))
    assert raised.value.status == 409
    core.delete_node("node-a")
    assert core.list_node().items == []


@pytest.mark.netns
def test_also_listens_inside_another_network_namespace(core):
    with Namespaces() as namespaces:
        namespace = namespaces.add_unique("wgcni-api")
        port = 20000 + secrets.randbelow(20000)
        with ApiServer(also_listen=[NamespacedListener(namespace, "127.0.0.1", port)]) as server:
            admin = api_client_for_url(server.url, server.admin_token, ca_file=server.ca_file)
            make_node(client.CoreV1Api(admin), "node-a")
            fetch = (f"import ssl, urllib.request; print(urllib.request.urlopen(urllib.request.Request("
                     f"'https://127.0.0.1:{port}/api/v1/nodes', headers={{'Authorization': 'Bearer "
                     f"{server.admin_token}'}}), context=ssl.create_default_context(cafile='{server.ca_file}'))"
                     ".read().decode())")
            probe = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", fetch],
                                   capture_output=True, text=True, timeout=30)
            assert probe.returncode == 0, probe.stderr
            assert [item["metadata"]["name"] for item in json.loads(probe.stdout)["items"]] == ["node-a"]
            server.restart()
            probe = subprocess.run(
                ["ip", "netns", "exec", namespace, sys.executable, "-c",
                 f"import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:{port}/version', "
                 f"context=ssl.create_default_context(cafile='{server.ca_file}'))"],
                capture_output=True, text=True, timeout=30)
            assert probe.returncode == 0, probe.stderr


def test_delay_applies_to_every_request_until_cleared(server, core):
    server.set_delay(0.2)
    for _ in range(2):
        started = time.monotonic()
        core.list_node()
        assert time.monotonic() - started >= 0.2
    # cleared is checked without timing the fast path: a delay still in force would outlast the request's timeout
    # fourfold and fail it, while a request without the delay has that whole timeout to finish on a loaded machine
    request_timeout = 30 * TIME_SCALE
    server.set_delay(4 * request_timeout)
    server.clear_faults()
    assert core.list_node(_request_timeout=request_timeout).items == []


def test_watch_ends_cleanly_at_timeout_seconds(core):
    started = time.monotonic()
    events = list(watch.Watch().stream(core.list_node, resource_version="1", timeout_seconds=1))
    assert events == [] and 0.9 <= time.monotonic() - started < 5


@pytest.mark.parametrize("method, path", [("POST", "/api/v1/nodes"), ("PUT", "/api/v1/nodes/node-a")])
def test_create_and_update_bodies_must_be_json_objects(server, core, method, path):
    make_node(core, "node-a")
    request = urllib.request.Request(server.url + path, data=b"[1, 2]", method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {server.admin_token}"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=5, context=server.tls.client_context())
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["message"] == "the request body must be an object"


def status_of(custom, status):
    obj = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a")
    obj["status"] = status
    return custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-a", obj)


def test_custom_resources_are_pruned_and_validated_against_the_crd_schema(core, custom):
    owner = make_node(core, "node-a")
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, wg_object("node-a", owner))
    written = status_of(custom, {"publicKey": "", "encryption": "Unavailable", "endpoint": {
        "address": "10.0.0.4", "port": 51820, "zone": "eu"}, "extra": {"a": 1}})
    assert written["status"] == {"publicKey": "", "encryption": "Unavailable",
                                 "endpoint": {"address": "10.0.0.4", "port": 51820}}, "unknown fields are pruned"
    for status, invalid in [
        ({"endpoint": {"port": 70000}}, "status.endpoint.port: Invalid value: 70000"),
        ({"encryption": "Sometimes"}, "status.encryption: Invalid value: 'Sometimes'"),
        ({"publicKey": "not a key"}, "status.publicKey: Invalid value: 'not a key'"),
        ({"nodeIPs": ["10.0.0.4"] * 17}, "status.nodeIPs: Invalid value"),
        ({"podIPsChangedAt": "yesterday"}, "status.podIPsChangedAt: Invalid value: 'yesterday'"),
        ({"conditions": [{"type": "Ready", "status": "True"}, {"type": "Ready", "status": "False"}]},
         "status.conditions[1]: Duplicate value"),
        ({"conditions": [{"type": "Ready"}]}, "status.conditions[0]: Invalid value"),
    ]:
        with pytest.raises(ApiException) as raised:
            status_of(custom, status)
        assert raised.value.status == 422
        message = json.loads(raised.value.body)["message"]
        assert message.startswith('WireguardNode.wgcni.io "node-a" is invalid: ') and invalid in message, message
    assert custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a")["status"] == written["status"]


def test_a_sigkilled_server_leaves_no_key_and_its_directory_goes_with_the_next_server(tmp_path, monkeypatch):
    """The private key is on disk only while the TLS context loads it; what a SIGKILLed process leaves (its CA
    and serving certificates, 0600 in a 0700 directory named after it) the next server on the host removes."""
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal\n"
         "from wgcni_lab.apiserver.tls import ServingCertificates\n"
         "tls = ServingCertificates(['127.0.0.1'])\n"
         "print(os.getpid(), tls.directory, flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)"],
        env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    pid, directory_name = killed.stdout.split()
    left = pathlib.Path(directory_name)
    assert left.parent == tmp_path and left.name.startswith(f"{TEMPORARY_PREFIX}{pid}-")
    assert left.stat().st_mode & 0o777 == 0o700
    assert {path.name: path.stat().st_mode & 0o777 for path in left.iterdir()} == {"ca.crt": 0o600,
                                                                                   "apiserver.crt": 0o600}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = ServingCertificates(["127.0.0.1"])
    assert not left.exists()
    assert sorted(path.name for path in live.directory.iterdir()) == ["apiserver.crt", "ca.crt"]
    directory = live.directory
    del live
    assert not directory.exists()


def test_certificates_in_a_given_directory_stay_for_their_owner_to_remove(tmp_path):
    directory = tmp_path / "apiserver-tls"
    with ApiServer(tls_dir=directory) as server:
        assert pathlib.Path(server.ca_file).parent == directory
        assert directory.stat().st_mode & 0o777 == 0o700
        assert sorted(path.name for path in directory.iterdir()) == ["apiserver.crt", "ca.crt"]
        core = client.CoreV1Api(api_client_for_url(server.url, server.admin_token, ca_file=server.ca_file))
        assert core.list_node().items == []
    assert directory.exists()
