"""Pure conversions of the Kubernetes sync: exact pod IP aggregation and expansion, object parsing, status."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_hook.addresses import address_texts, host_keys
from node_hook.cluster import expand_prefixes, published_status, remote_node_from_object, rotation_of
from tests.sync.helpers import announcement, new_key

ipv4_in_vnet = st.integers(min_value=0, max_value=2047).map(lambda n: str(ipaddress.IPv4Address("10.240.0.0") + n))
ipv6_in_pods = st.integers(min_value=0, max_value=1023).map(lambda n: str(ipaddress.IPv6Address("fd00::") + n))


def published_prefixes(ips: set[str]) -> list[str]:
    return published_status(announcement("a", new_key(), ips), False, 1.0, None, now=1.0)["podIPPrefixes"]


def collapsed_per_family(ips: set[str]) -> list[str]:
    """The publication's rule written with the standard library: exact aggregation, IPv4 first, then IPv6."""
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    return [str(network) for version in (4, 6)
            for network in ipaddress.collapse_addresses(a for a in addresses if a.version == version)]


@settings(max_examples=200, deadline=None)
@given(st.sets(ipv4_in_vnet | ipv6_in_pods, max_size=300))
def test_aggregation_is_exact_and_minimal(ips):
    prefixes = published_prefixes(ips)
    assert prefixes == collapsed_per_family(ips)
    assert expand_prefixes(prefixes, 1 << 20) == host_keys(ips, "test")
    networks = [ipaddress.ip_network(prefix) for prefix in prefixes]
    # minimal: no two prefixes could be merged into one
    for version in (4, 6):
        family = [network for network in networks if network.version == version]
        assert list(ipaddress.collapse_addresses(family)) == family
    versions = [network.version for network in networks]
    assert versions == sorted(versions), "IPv4 prefixes first"


def test_aggregation_examples():
    assert published_prefixes({"10.240.0.8", "10.240.0.9", "10.240.0.10", "10.240.0.11", "10.240.0.12"}) == [
        "10.240.0.8/30", "10.240.0.12/32"]
    assert published_prefixes({"fd00::1", "10.240.0.1"}) == ["10.240.0.1/32", "fd00::1/128"]
    assert published_prefixes(set()) == []


def test_expansion_limit_and_malformed_prefixes():
    with pytest.raises(ValueError):
        expand_prefixes(["10.0.0.0/8"], 65536)
    with pytest.raises(ValueError):
        expand_prefixes(["10.240.0.1/24"], 65536)  # host bits set: not something a node publishes
    assert address_texts(expand_prefixes(["10.240.0.0/31"], 2)) == ["10.240.0.0", "10.240.0.1"]


def _object(status):
    return {"metadata": {"name": "node-b", "resourceVersion": "7"}, "status": status}


def test_remote_node_from_object():
    key = new_key()
    status = published_status(announcement("node-b", key, {"10.240.0.70", "10.240.0.71"}, endpoint="10.240.0.35"),
                              opted_out=False, pod_ips_changed_at=1_700_000_000.25, previous=None, now=1.0)
    remote = remote_node_from_object(_object(status), 65536)
    assert remote.public_key == key and remote.endpoint_ip == "10.240.0.35" and remote.endpoint_port == 51820
    assert address_texts(remote.pod_ips) == ["10.240.0.70", "10.240.0.71"]
    assert address_texts(remote.node_ips) == ["10.240.0.35"]
    assert remote.pod_ips_changed_at == pytest.approx(1_700_000_000.25)
    assert status["podIPPrefixes"] == ["10.240.0.70/31"] and status["podIPCount"] == 2
    assert status["publicKeyPrefix"] == key[:8] and status["encryption"] == "WireGuard"


def test_object_without_status_is_not_a_node_yet_and_bad_objects_are_rejected():
    assert remote_node_from_object(_object(None), 10) is None
    with pytest.raises(ValueError):
        remote_node_from_object(_object({"publicKey": "bm90IGEga2V5"}), 10)
    with pytest.raises(ValueError):
        remote_node_from_object(_object({"publicKey": new_key(), "endpoint": {"port": 51820}}), 10)
    with pytest.raises(ValueError):
        remote_node_from_object(_object({"publicKey": "", "nodeIPs": ["not-an-ip"]}), 10)
    keyless = remote_node_from_object(_object({"publicKey": "", "nodeIPs": ["10.240.0.35"]}), 10)
    assert keyless.public_key == "" and address_texts(keyless.node_ips) == ["10.240.0.35"]


def test_a_rotation_is_published_and_read_back_and_a_malformed_one_refused():
    key, next_key = new_key(), new_key()
    rotating = replace(announcement("node-b", key, {"10.240.0.70"}, endpoint="10.240.0.35"),
                       next_public_key=next_key, key_switch_at=1_700_000_005.5)
    status = published_status(rotating, opted_out=False, pod_ips_changed_at=1.0, previous=None, now=1.0)
    assert status["nextPublicKey"] == next_key and status["keySwitchAt"] == "2023-11-14T22:13:25.500000Z"
    remote = remote_node_from_object(_object(status), 10)
    assert (remote.public_key, remote.next_public_key) == (key, next_key)
    assert remote.key_switch_at == pytest.approx(1_700_000_005.5)
    plain = published_status(announcement("node-b", key, set()), opted_out=False, pod_ips_changed_at=1.0,
                             previous=status, now=2.0)
    assert "nextPublicKey" not in plain and "keySwitchAt" not in plain  # the switch is over: both go
    assert rotation_of(plain) == ("", 0.0)
    opted_out = published_status(rotating, opted_out=True, pod_ips_changed_at=1.0, previous=None, now=1.0)
    assert "nextPublicKey" not in opted_out
    without_time = {field: value for field, value in status.items() if field != "keySwitchAt"}
    for broken in ({**status, "nextPublicKey": "bm90IGEga2V5"}, without_time, {**status, "keySwitchAt": 5},
                   {**status, "keySwitchAt": "soon"}):
        with pytest.raises(ValueError):
            remote_node_from_object(_object(broken), 10)
    with pytest.raises(ValueError, match="without a publicKey"):
        remote_node_from_object(_object({**status, "publicKey": ""}), 10)


def test_opted_out_status_publishes_no_key():
    status = published_status(announcement("node-b", new_key(), set()), opted_out=True, pod_ips_changed_at=0.0,
                              previous=None, now=0.0)
    assert status["publicKey"] == "" and status["publicKeyPrefix"] == "" and status["encryption"] == "OptedOut"


def test_status_keeps_timestamps_when_nothing_they_describe_changed():
    first = published_status(announcement("a", new_key(), {"10.240.0.70"}), False, 100.0, None, now=100.0)
    same_ips = published_status(announcement("a", new_key(), {"10.240.0.70"}, message="other"), False, 200.0,
                                first, now=200.0)
    assert same_ips["podIPsChangedAt"] == first["podIPsChangedAt"]
    assert same_ips["conditions"][0]["lastTransitionTime"] == first["conditions"][0]["lastTransitionTime"]
    moved = published_status(announcement("a", new_key(), {"10.240.0.71"}, ready=False), False, 300.0, same_ips,
                             now=300.0)
    assert moved["podIPsChangedAt"] != first["podIPsChangedAt"]
    assert moved["conditions"][0]["status"] == "False"
    assert moved["conditions"][0]["lastTransitionTime"] != first["conditions"][0]["lastTransitionTime"]


def test_claim_revisions_are_published_per_prefix_and_read_back_per_ip() -> None:
    ips = {"10.240.0.70", "10.240.0.71", "10.240.0.90"}
    local = announcement("node-b", new_key(), ips)
    claims = {key: (7 if address_texts([key]) == ["10.240.0.90"] else 3) for key in local.pod_ips}
    status = published_status(local, opted_out=False, pod_ips_changed_at=1.0, previous=None, now=1.0, claims=claims)
    assert status["podIPPrefixes"] == ["10.240.0.70/31", "10.240.0.90/32"]
    assert status["podIPClaimRevisions"] == ["3", "7"]
    remote = remote_node_from_object({"metadata": {"name": "node-b"}, "status": status}, 100)
    assert [(revision, address_texts(keys)) for revision, keys in remote.pod_ip_claims] == [
        (3, ["10.240.0.70", "10.240.0.71"]), (7, ["10.240.0.90"])]
    for revisions in (["3"], ["3", "x"], "3,7"):
        with pytest.raises(ValueError):
            remote_node_from_object({"metadata": {"name": "node-b"}, "status": {
                **status, "podIPClaimRevisions": revisions}}, 100)
