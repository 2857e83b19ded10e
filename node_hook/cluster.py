"""Peer sync through the Kubernetes API: the hook's `PeerSource` backed by `WireguardNode` objects (conf/crd.yaml).

This is the only module of the hook that imports `kubernetes`. It does three things, each on its own thread:

- **Peers**: list, then watch `wireguardnodes` from the list's resourceVersion with bookmarks; 410 Gone → relist;
  any other failure → re-watch from the last resourceVersion after an exponential backoff with full jitter; a periodic
  relist as a safety net. Every other node's object becomes a `RemoteNode` (pod IP prefixes expanded back into
  addresses). The hook (a `PeerSink`) is told in deltas, as Calico and Cilium feed their dataplanes: `nodes_synced`
  with the complete list once the first list of peers *and* of this node's own Node object have completed (so the
  hook never prunes a live mesh at start-up) and after every relist, then `node_changed` / `node_gone` for each
  watch event - O(one node) per event, not a copy of every node.
- **Every Node's addresses**: list+watch of all Nodes for their `status.addresses` (InternalIP, ExternalIP): a
  peer's endpoint and node IPs are taken only if they are among its Node's addresses (else the peer is ignored and
  listed in `status.invalid_objects`), so a node cannot announce another node's address as its own.
- **Own Node**: list+watch of this node's `Node` (field selector), for its uid (owner reference) and the opt-out
  label `wgcni.io/wireguard=disabled`. An opted-out node publishes an empty key (peers reach it in plaintext) and
  hands the hook every remote node with an empty key, so it programs no peer and sends plaintext too.
- **What the API holds**: every change of this node's own object as the API returns it (list, watch, the answer to
  a write), and every write's outcome, is reported to the hook as a `Publication` (`on_published`): the key and IPs
  the API holds and whether the latest write is written, pending, denied (401/403/404/422: RBAC, admission, no Node
  of this name) or unreachable. The hook trusts its publication only as far as the API holds it.
- **Publishing**: `publish()` only records the latest announcement; one writer thread writes it into this node's
  own object (status subresource) and the Node's `wgcni.io/public-key` annotation. Writes are paced (`WritePacer`):
  a lone change is written at once, a burst of pod churn is coalesced into writes of the latest state spaced
  1 / `max_writes_per_second` apart, and never more than `write_burst` writes go in any `write_burst /
  max_writes_per_second` seconds (defaults: 2 in any second). Writes use optimistic concurrency on resourceVersion
  (409 → re-read and retry), and a failed write is retried with backoff until the latest announcement is written —
  an update is never dropped (Calico #12715).
"""

from __future__ import annotations

import base64
import binascii
import collections
import ipaddress
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from node_hook.addresses import IPNetwork, address_texts, aggregate, host_keys, prefix_keys
from node_hook.model import UNKNOWN_PUBLICATION, LocalAnnouncement, Publication, RemoteNode
from node_hook.peers import PeerSink

log = logging.getLogger(__name__)

GROUP = "wgcni.io"
VERSION = "v1alpha1"
PLURAL = "wireguardnodes"
KIND = "WireguardNode"
OPT_OUT_LABEL = "wgcni.io/wireguard"  # on the Node; the value "disabled" opts the node out of WireGuard
OPT_OUT_VALUE = "disabled"
PUBLIC_KEY_ANNOTATION = "wgcni.io/public-key"  # on the Node, for visibility; absent when the node has no key
MANAGED_BY = {"app.kubernetes.io/managed-by": "wgcni-node"}
USER_AGENT = "wgcni-node"

JSON = dict[str, Any]
DENIED_STATUSES = (400, 401, 403, 404, 422)  # the API will refuse the same write again: not a passing fault
MAX_RETRY_AFTER = 300.0  # seconds; a longer Retry-After is taken as this


@dataclass(frozen=True)
class SyncSettings:
    """Tuning of the Kubernetes sync; the defaults suit production, tests shorten the intervals."""

    max_writes_per_second: float = 2.0  # per node, across every write this node makes (WritePacer)
    write_burst: int = 2  # at most this many writes in any write_burst / max_writes_per_second seconds
    burst_gap: float = 0.05  # changes closer together than this are a burst, coalesced into evenly spaced writes
    watch_timeout_seconds: int = 300  # server-side timeout of one watch request; it is then resumed
    request_timeout: float = 10.0  # connect and read timeout of one non-watch request
    watch_read_margin: float = 30.0  # a watch with no byte for timeout + margin seconds is considered dead
    # Full relist of peers and Nodes (safety net), after 75-100% of this (jittered: hooks started together by a node
    # pool upgrade do not relist together). Every hook's relist of every object is the API's biggest steady cost
    # (bench/p9_api_cost.py): at 300 s and 5 000 nodes it was 0.7 GB/s.
    resync_interval: float = 3600.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    conflict_retries: int = 5  # 409s answered by re-reading at once before backing off
    max_pod_ips_per_node: int = 65536  # a published object expanding to more addresses is rejected
    list_page_size: int = 500  # objects per page of a relist (limit/continue), as client-go's reflector pages


@dataclass
class SyncStatus:
    """What the sync is doing, for the hook's status, CLI and metrics."""

    peers_synced: bool = False
    node_synced: bool = False
    opted_out: bool = False
    remote_nodes: int = 0
    invalid_objects: dict[str, str] = field(default_factory=dict)  # name -> why it was ignored
    writes: int = 0
    write_errors: int = 0
    watch_errors: int = 0
    relists: int = 0
    published: bool = False  # the latest announcement is written
    last_error: str = ""
    addresses_synced: bool = False  # every Node's status.addresses listed (peers' endpoints are checked against them)


# --- pure conversions ------------------------------------------------------------------------------------------

def expand_prefixes(prefixes: Iterable[str], limit: int) -> frozenset[IPNetwork]:
    """The model's keys of every address of the published prefixes (parsed once here: the hook shares these
    objects); ValueError when one is malformed or there are more than `limit`."""
    keys: set[IPNetwork] = set()
    for text in prefixes:
        if not isinstance(text, str):
            raise ValueError(f"pod IP prefix {text!r} is not a string")
        keys.update(prefix_keys(text, limit - len(keys)))
        if len(keys) > limit:
            raise ValueError(f"pod IP prefixes expand to more than {limit} addresses")
    return frozenset(keys)


def _valid_public_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _timestamp(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def remote_node_from_object(obj: JSON, max_pod_ips: int) -> RemoteNode | None:
    """The RemoteNode a WireguardNode object describes; None when it has published nothing yet.
    Raises ValueError (with the reason) for an object that must not be programmed."""
    name = obj["metadata"]["name"]
    status = obj.get("status")
    if not status:
        return None
    key = status.get("publicKey", "")
    if not isinstance(key, str) or (key and not _valid_public_key(key)):
        raise ValueError("publicKey is not a base64 X25519 key")
    endpoint = status.get("endpoint") or {}
    endpoint_ip = endpoint.get("address") or None
    if endpoint_ip is not None:
        endpoint_ip = str(ipaddress.ip_address(endpoint_ip))
    port = endpoint.get("port", 0)
    if key and (endpoint_ip is None or not isinstance(port, int) or not 1 <= port <= 65535):
        raise ValueError("a node with a key needs an endpoint address and port")
    node_ips = host_keys((str(ipaddress.ip_address(ip)) for ip in status.get("nodeIPs") or []),
                         f"node {name} node IPs")
    prefixes = status.get("podIPPrefixes") or []
    pod_ips = expand_prefixes(prefixes, max_pod_ips)
    changed = status.get("podIPsChangedAt")
    next_key, switch_at = rotation_of(status)
    if next_key and not key:
        raise ValueError("nextPublicKey without a publicKey")
    return RemoteNode(
        name=name, public_key=key, endpoint_ip=endpoint_ip, endpoint_port=port if isinstance(port, int) else 0,
        node_ips=node_ips, pod_ips=pod_ips, pod_ips_changed_at=_parse_timestamp(changed) if changed else 0.0,
        pod_ip_claims=claim_groups(prefixes, status.get("podIPClaimRevisions"), max_pod_ips),
        next_public_key=next_key, key_switch_at=switch_at,
    )


def rotation_of(status: JSON) -> tuple[str, float]:
    """(next public key, switch time) of a key rotation the status announces, ("", 0.0) when none.
    ValueError for a malformed announcement."""
    next_key = status.get("nextPublicKey") or ""
    if not next_key:
        return "", 0.0
    if not isinstance(next_key, str) or not _valid_public_key(next_key):
        raise ValueError("nextPublicKey is not a base64 X25519 key")
    switch_at = status.get("keySwitchAt")
    try:
        return next_key, _parse_timestamp(switch_at)  # type: ignore[arg-type]
    except (AttributeError, TypeError, ValueError):
        raise ValueError("nextPublicKey needs a keySwitchAt timestamp") from None


def claim_groups(prefixes: list[str], revisions: object, limit: int) -> tuple[tuple[int, frozenset[IPNetwork]], ...]:
    """The published (revision, pod IPs) claims, revisions ascending; () when the object has none (a publisher
    from before them). ValueError when the revisions do not pair up with the prefixes."""
    if revisions is None:
        return ()
    if not isinstance(revisions, list) or len(revisions) != len(prefixes):
        raise ValueError("podIPClaimRevisions does not give one revision per pod IP prefix")
    groups: dict[int, set[IPNetwork]] = {}
    for prefix, revision in zip(prefixes, revisions, strict=True):
        if not isinstance(revision, str) or not revision.isdigit():
            raise ValueError(f"claim revision {revision!r} is not a resourceVersion")
        groups.setdefault(int(revision), set()).update(prefix_keys(prefix, limit))
    return tuple((revision, frozenset(keys)) for revision, keys in sorted(groups.items()))


def published_status(announcement: LocalAnnouncement, opted_out: bool, pod_ips_changed_at: float,
                     previous: JSON | None, now: float, claims: Mapping[IPNetwork, int] | None = None) -> JSON:
    """The status this node writes into its own object. The pod IP timestamp and the Ready condition's
    transition time are kept from `previous` when the pod IPs or readiness did not change. With `claims` (pod IP ->
    the revision after which this node claimed it), the pod IPs are aggregated per claim revision, oldest first, and
    `podIPClaimRevisions` gives each prefix its revision."""
    previous = previous or {}
    key = "" if opted_out else announcement.public_key
    revisions: list[str] = []
    if claims is None:
        prefixes = [str(prefix) for prefix in aggregate(announcement.pod_ips)]
    else:
        groups: dict[int, list[IPNetwork]] = {}
        for ip in announcement.pod_ips:
            groups.setdefault(claims[ip], []).append(ip)
        prefixes = []
        for revision in sorted(groups):
            aggregated = [str(prefix) for prefix in aggregate(groups[revision])]
            prefixes.extend(aggregated)
            revisions.extend([str(revision)] * len(aggregated))
    if previous.get("podIPPrefixes") == prefixes and previous.get("podIPsChangedAt"):
        changed_at = previous["podIPsChangedAt"]
    else:
        changed_at = _timestamp(pod_ips_changed_at)
    ready = "True" if announcement.ready else "False"
    previous_ready: JSON = next((c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), {})
    transition = previous_ready.get("lastTransitionTime") if previous_ready.get("status") == ready else None
    endpoint: JSON = {"port": announcement.endpoint_port}
    if announcement.endpoint_ip:
        endpoint["address"] = announcement.endpoint_ip
    node_ips = sorted(announcement.node_ips, key=lambda ip: (ipaddress.ip_address(ip).version,
                                                             ipaddress.ip_address(ip)))
    return {
        "publicKey": key,
        "publicKeyPrefix": key[:8],
        **({"nextPublicKey": announcement.next_public_key, "keySwitchAt": _timestamp(announcement.key_switch_at)}
           if key and announcement.next_public_key else {}),
        "encryption": "OptedOut" if opted_out else ("WireGuard" if key else "Unavailable"),
        "endpoint": endpoint,
        "nodeIPs": node_ips,
        "podIPPrefixes": prefixes,
        **({"podIPClaimRevisions": revisions} if claims is not None else {}),
        "podIPCount": len(announcement.pod_ips),
        "podIPsChangedAt": changed_at,
        "mtu": announcement.mtu,
        "conditions": [{
            "type": "Ready", "status": ready,
            "reason": "DataplaneProgrammed" if announcement.ready else "DataplaneNotProgrammed",
            "message": announcement.message[:1024],
            "lastTransitionTime": transition or datetime.fromtimestamp(now, UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
        }],
    }


def node_addresses(node: JSON) -> frozenset[str]:
    """The IP addresses a Node's status lists (InternalIP, ExternalIP), as the kubelet and the cloud report them."""
    addresses = set()
    for entry in (node.get("status") or {}).get("addresses") or []:
        if entry.get("type") in ("InternalIP", "ExternalIP"):
            try:
                addresses.add(str(ipaddress.ip_address(entry.get("address", ""))))
            except ValueError:
                continue
    return frozenset(addresses)


def address_mismatch(remote: RemoteNode, addresses: frozenset[str] | None) -> str:
    """Why a peer's published endpoint or node IPs cannot be taken (they are not its Node's addresses), or "".
    A Node that lists no addresses (none on AKS: the kubelet reports InternalIP) is not checked."""
    if not addresses:
        return ""
    if remote.endpoint_ip is not None and remote.endpoint_ip not in addresses:
        return (f"endpoint {remote.endpoint_ip} is not an address of Node {remote.name} "
                f"({', '.join(sorted(addresses))})")
    foreign = [ip for ip in address_texts(remote.node_ips) if ip not in addresses]
    if foreign:
        return f"node IPs {', '.join(foreign)} are not addresses of Node {remote.name} ({', '.join(sorted(addresses))})"
    return ""


def held_addresses(status: JSON | None, limit: int) -> frozenset[str]:
    """The node and pod IPs a WireguardNode's status lists, as addresses (pod IP prefixes expanded, at most
    `limit`); what a malformed status lists is left out."""
    status = status or {}
    addresses: set[str] = set()
    for text in list(status.get("nodeIPs") or []) + list(status.get("podIPPrefixes") or []):
        try:
            network = ipaddress.ip_network(text, strict=False)
        except (TypeError, ValueError):
            continue
        if network.num_addresses > limit - len(addresses):
            continue
        addresses.update(str(address) for address in (network if network.num_addresses > 1 else [network[0]]))
    return frozenset(addresses)


def is_opted_out(node: JSON | None) -> bool:
    labels = ((node or {}).get("metadata") or {}).get("labels") or {}
    return labels.get(OPT_OUT_LABEL) == OPT_OUT_VALUE


# --- API clients -----------------------------------------------------------------------------------------------

def api_client_from_environment(kubeconfig: str | None = None) -> client.ApiClient:
    """In a pod: the service account (the client re-reads its projected token every minute); otherwise
    `kubeconfig`, $KUBECONFIG or ~/.kube/config, whose `tokenFile` is re-read whenever the file changes (the stock
    loader reads it once, and a kubelet-rotated token expires)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    api_client = config.new_client_from_config(config_file=kubeconfig)
    token_file = _kubeconfig_token_file(kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")
    if token_file is not None:
        _refresh_token_from(api_client.configuration, token_file)
    return api_client


def api_client_for_url(url: str, token: str = "", token_file: str | os.PathLike[str] | None = None,
                       ca_file: str | None = None) -> client.ApiClient:
    """A client for `url` (verified with the CA in `ca_file`) with a bearer token, given or re-read from
    `token_file` whenever that changes."""
    configuration = client.Configuration(host=url)
    if ca_file is not None:
        configuration.ssl_ca_cert = ca_file
    if token:
        configuration.api_key = {"BearerToken": f"Bearer {token}"}
    if token_file is not None:
        _refresh_token_from(configuration, os.fspath(token_file))
    return client.ApiClient(configuration)


def _kubeconfig_token_file(path: str) -> str | None:
    """The current context's user's tokenFile (absolute), or None."""
    path = os.path.expanduser(path.split(os.pathsep)[0])
    try:
        with open(path) as file:
            kubeconfig = yaml.safe_load(file) or {}
        context = next(c["context"] for c in kubeconfig.get("contexts") or []
                       if c.get("name") == kubeconfig.get("current-context"))
        user = next(u.get("user") or {} for u in kubeconfig.get("users") or [] if u.get("name") == context["user"])
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    token_file = user.get("tokenFile") if isinstance(user, dict) else None
    if not token_file:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(token_file))


class _TokenFile:
    """A bearer token file as the kubelet keeps it (rewritten before the token expires): re-read when its mtime or
    size changes, checked before every request (one stat)."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int] | None = None

    def refresh(self, configuration: client.Configuration) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return  # keep the last token; the request says what the API thinks of it
        if (stat.st_mtime_ns, stat.st_size) == self._seen:
            return
        try:
            with open(self.path) as token:
                text = token.read().strip()
        except OSError:
            return
        self._seen = (stat.st_mtime_ns, stat.st_size)
        if text:
            configuration.api_key["BearerToken"] = f"Bearer {text}"


def _refresh_token_from(configuration: client.Configuration, path: str) -> None:
    token_file = _TokenFile(path)
    token_file.refresh(configuration)
    configuration.refresh_api_key_hook = token_file.refresh  # type: ignore[assignment]  # declared None


# --- helpers ---------------------------------------------------------------------------------------------------

class Backoff:
    """Exponential backoff with jitter: the n-th delay is uniform in [c/2, c] with c = min(max, initial * 2**n), so
    hooks that failed together (an API server restart) do not come back together."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.attempt = initial, maximum, 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class WritePacer:
    """When the next write may go: a lone change at once, a burst coalesced, and never more than `burst` writes in
    any `burst / writes_per_second` seconds (with the defaults: 2 writes in any second).

    A change is part of a burst when it comes less than `burst_gap` after the change before it. A write of a burst
    waits `1 / writes_per_second` after the previous write, so sustained churn is written evenly spaced (the latest
    state at most that late); a write of a lone change waits only for the sliding window. `clock` and `sleep` are
    injectable so that the pacing is tested on a fake clock; `sleep(seconds)` returns True when the writer is to
    stop."""

    def __init__(self, writes_per_second: float, burst: int, burst_gap: float, sleep: Callable[[float], bool],
                 clock: Callable[[], float] = time.monotonic):
        if writes_per_second <= 0 or burst < 1 or burst_gap < 0:
            raise ValueError("writes_per_second > 0, burst >= 1 and burst_gap >= 0 are required")
        self.spacing = 1.0 / writes_per_second
        self.window = burst / writes_per_second
        self.burst_gap = burst_gap
        self.sleep, self.clock = sleep, clock
        self._writes: collections.deque[float] = collections.deque(maxlen=burst)  # the latest writes' times
        self._last_change = -math.inf
        self._bursting = False  # the latest change came within burst_gap of the one before it

    def changed(self) -> None:
        """The state to write changed (called by `publish`, under the source's lock)."""
        now = self.clock()
        self._bursting = now - self._last_change < self.burst_gap
        self._last_change = now

    def delay(self) -> float:
        """Seconds until the next write may go (0: now)."""
        earliest = -math.inf
        if len(self._writes) == self._writes.maxlen:
            earliest = self._writes[0] + self.window
        if self._bursting and self._writes:
            earliest = max(earliest, self._writes[-1] + self.spacing)
        return max(0.0, earliest - self.clock())

    def wait(self) -> bool:
        """Sleep until the next write may go; False when stopping."""
        while (delay := self.delay()) > 0:
            if self.sleep(delay):
                return False
        return True

    def spend(self) -> None:
        """A write goes now."""
        self._writes.append(self.clock())


def list_pages(list_call: Callable[..., JSON], page_size: int) -> JSON:
    """A complete list read in pages of `page_size` (limit/continue), every page at the first one's
    resourceVersion; an expired continue token raises the server's 410, on which the caller relists from the
    start."""
    listing = list_call(limit=page_size)
    items = list(listing.get("items") or [])
    token = (listing.get("metadata") or {}).get("continue")
    while token:
        page = list_call(limit=page_size, _continue=token)
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
    return {"metadata": {"resourceVersion": listing["metadata"]["resourceVersion"]}, "items": items}


def retry_after(error: Exception) -> float:
    """The seconds a 429 or 503 asks the client to wait (Retry-After), 0 otherwise. urllib3 already waits that long
    before retrying idempotent requests itself; this covers the rest (POST, PATCH) and the retries it gave up."""
    if not isinstance(error, ApiException) or error.status not in (429, 503) or not error.headers:
        return 0.0
    try:
        return min(float(error.headers.get("Retry-After") or 0), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return 0.0


class _NodeMissing(Exception):
    """This node's Node object does not exist (yet): nothing can own the WireguardNode object."""


class _ListWatch:
    """List, then watch from the list's resourceVersion with bookmarks; resume after failures; relist on 410 Gone
    and every `resync_interval`. Calls `on_list(items)` with a complete set and `on_event(type, object)` after."""

    def __init__(self, what: str, list_call: Callable[[], JSON], watch_call: Callable[..., Any],
                 watch_kwargs: JSON, on_list: Callable[[list[JSON]], None],
                 on_event: Callable[[str, JSON], None], settings: SyncSettings, stopping: threading.Event,
                 status: SyncStatus):
        self.what, self.list_call, self.watch_call, self.watch_kwargs = what, list_call, watch_call, watch_kwargs
        self.on_list, self.on_event = on_list, on_event
        self.settings, self.stopping, self.status = settings, stopping, status
        self._watch: watch.Watch | None = None
        self._lock = threading.Lock()
        self.revision = 0  # the latest resourceVersion seen (list, event or bookmark): how far this node has seen

    def _seen(self, resource_version: str) -> None:
        if resource_version.isdigit():
            self.revision = max(self.revision, int(resource_version))

    def run(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        resource_version: str | None = None
        listed_at = 0.0
        while not self.stopping.is_set():
            try:
                if resource_version is None or time.monotonic() - listed_at >= self.settings.resync_interval:
                    listing = self.list_call()
                    resource_version = listing["metadata"]["resourceVersion"]
                    self._seen(resource_version)
                    listed_at = time.monotonic() - random.uniform(0.0, 0.25) * self.settings.resync_interval
                    self.on_list(listing.get("items") or [])
                    self.status.relists += 1
                resource_version = self._watch_from(resource_version, listed_at)
                backoff.reset()
            except ApiException as error:
                if error.status == 410:
                    log.info("%s: resourceVersion %s expired (410 Gone); relisting", self.what, resource_version)
                    resource_version = None
                    continue
                self._failed(backoff, f"{self.what}: API error {error.status} {error.reason}", retry_after(error))
            except Exception as error:  # noqa: BLE001 - connection errors come in many types; all are retried
                if self.stopping.is_set():
                    return
                self._failed(backoff, f"{self.what}: {type(error).__name__}: {error}")

    def _watch_from(self, resource_version: str, listed_at: float) -> str:
        """Watch until the server ends the request or the next relist is due; returns the last resourceVersion."""
        remaining = self.settings.resync_interval - (time.monotonic() - listed_at)
        timeout = max(1, int(min(self.settings.watch_timeout_seconds, remaining)))
        stream = watch.Watch()
        with self._lock:
            if self.stopping.is_set():
                return resource_version
            self._watch = stream
        try:
            for event in stream.stream(
                    self.watch_call, **self.watch_kwargs, resource_version=resource_version,
                    allow_watch_bookmarks=True, timeout_seconds=timeout,
                    _request_timeout=(self.settings.request_timeout, timeout + self.settings.watch_read_margin)):
                obj = event["raw_object"]
                resource_version = obj["metadata"]["resourceVersion"]
                self._seen(resource_version)
                if event["type"] != "BOOKMARK":
                    self.on_event(event["type"], obj)
                if self.stopping.is_set():
                    break
        finally:
            with self._lock:
                self._watch = None
        return resource_version

    def _failed(self, backoff: Backoff, message: str, at_least: float = 0.0) -> None:
        self.status.watch_errors += 1
        self.status.last_error = message
        delay = max(backoff.next_delay(), at_least)
        log.warning("%s; retrying in %.1fs", message, delay)
        self.stopping.wait(delay)

    def interrupt(self) -> None:
        with self._lock:
            if self._watch is not None:
                self._watch.stop()


class KubernetesPeerSource:
    """The hook's PeerSource (docs/design.md) over the Kubernetes API; see the module docstring."""

    def __init__(self, node_name: str, api_client: client.ApiClient, settings: SyncSettings = SyncSettings(),
                 clock: Callable[[], float] = time.time):
        self.node_name = node_name
        self.settings = settings
        self.clock = clock
        api_client.user_agent = f"{USER_AGENT}/{node_name}"  # the API server's logs and audit name the caller
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.status = SyncStatus()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sink: PeerSink | None = None
        self._delivered: set[str] = set()  # the remote nodes the hook holds now (emit lock): status.remote_nodes
        self._emit_lock = threading.Lock()
        # Other nodes' WireguardNode objects, parsed as they arrive: name -> (resourceVersion, parsed node, why
        # ignored). Only the parsed form is kept - the raw objects of 5 000 nodes x 250 scattered pod IPs hold
        # 1.25 M prefix strings - and an event parses only the object it changed, so its cost does not grow with
        # the cluster.
        self._peers: dict[str, tuple[str, RemoteNode | None, str]] = {}
        self._node_addresses: dict[str, frozenset[str]] = {}  # every Node's IP addresses, by name
        self._own_object: JSON | None = None
        self._node: JSON | None = None  # this node's Node object
        self._desired: LocalAnnouncement | None = None
        self._pod_ips_changed_at = 0.0
        self._desired_generation = 0
        self._written_generation = 0
        self._own_write_versions: collections.deque[str] = collections.deque(maxlen=16)  # our writes' versions
        # When this node claimed each of its pod IPs: the revision published with it (podIPClaimRevisions), kept
        # while the IP stays; a new IP gets the latest revision this node has seen when it is first written.
        self._claims: dict[IPNetwork, int] = {}
        self._pacer = WritePacer(settings.max_writes_per_second, settings.write_burst, settings.burst_gap,
                                 self._stopping.wait)
        self._threads: list[threading.Thread] = []
        self._list_watches: list[_ListWatch] = []
        self._peers_watch: _ListWatch | None = None  # the WireguardNodes' list-watch (one of `_list_watches`)
        self._own_object_seen = False  # the API has answered about this node's own object (list, watch or write)
        self._write_failure: tuple[str, str] | None = None  # (denied | unreachable, why) of the last failed write
        self._reported: Publication | None = None

    # --- PeerSource ----------------------------------------------------------------------------------------------
    def start(self, sink: PeerSink) -> None:
        self._sink = sink
        timeout = self.settings.request_timeout
        peers = _ListWatch(
            "wireguardnodes", lambda: list_pages(
                lambda **page: _object(self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, _request_timeout=timeout, **page)), self.settings.list_page_size),
            self.custom.list_cluster_custom_object, {"group": GROUP, "version": VERSION, "plural": PLURAL},
            self._peers_listed, self._peer_event, self.settings, self._stopping, self.status)
        field_selector = f"metadata.name={self.node_name}"
        own_node = _ListWatch(
            f"node {self.node_name}", lambda: self._list_own_node(field_selector),
            self.core.list_node, {"field_selector": field_selector},
            self._node_listed, self._node_event, self.settings, self._stopping, self.status)
        all_nodes = _ListWatch(
            "nodes", lambda: list_pages(lambda **page: _body(self.core.list_node(
                _preload_content=False, _request_timeout=timeout, **page)), self.settings.list_page_size),
            self.core.list_node, {}, self._nodes_listed, self._nodes_event, self.settings, self._stopping,
            self.status)
        self._list_watches = [peers, own_node, all_nodes]
        self._peers_watch = peers
        for name, target in (("peers", peers.run), ("node", own_node.run), ("nodes", all_nodes.run),
                             ("publish", self._publish_loop)):
            thread = threading.Thread(target=target, name=f"wgcni-sync-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def publish(self, announcement: LocalAnnouncement) -> None:
        with self._changed:
            if self._desired is None or self._desired.pod_ips != announcement.pod_ips:
                self._pod_ips_changed_at = self.clock()
            if announcement != self._desired:
                self._pacer.changed()
                self._desired = announcement
                self._desired_generation += 1
                self.status.published = False
                self._changed.notify_all()
        self._report_publication()

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        for list_watch in self._list_watches:
            list_watch.interrupt()
        for thread in self._threads:
            thread.join(timeout=self.settings.request_timeout + 5)
        self._threads.clear()

    # --- own Node --------------------------------------------------------------------------------------------
    def _list_own_node(self, field_selector: str) -> JSON:
        response = self.core.list_node(field_selector=field_selector, _preload_content=False,
                                       _request_timeout=self.settings.request_timeout)
        return _body(response)

    def _node_listed(self, items: list[JSON]) -> None:
        self._set_node(items[0] if items else None)

    def _node_event(self, event_type: str, obj: JSON) -> None:
        self._set_node(None if event_type == "DELETED" else obj)

    def _set_node(self, node: JSON | None) -> None:
        with self._changed:
            before = self._node
            self._node = node
            first = not self.status.node_synced
            self.status.node_synced = True
            opt_out_changed = is_opted_out(before) != is_opted_out(node)
            self.status.opted_out = is_opted_out(node)
            if (opt_out_changed or _uid(before) != _uid(node)
                    or _annotation(before) != _annotation(node)) and self._desired is not None:
                self._desired_generation += 1  # re-check what is written (owner, key, annotation)
                self._changed.notify_all()
        if opt_out_changed:
            log.info("node %s: WireGuard %s by label %s", self.node_name,
                     "disabled" if is_opted_out(node) else "enabled", OPT_OUT_LABEL)
        if first or opt_out_changed:
            self._emit_synced()
            self._report_publication()

    # --- every Node's addresses (a peer's endpoint and node IPs must be among them) ---------------------------
    def _nodes_listed(self, items: list[JSON]) -> None:
        addresses = {obj["metadata"]["name"]: node_addresses(obj) for obj in items}
        with self._changed:
            changed = {name for name in addresses.keys() | self._node_addresses.keys()
                       if addresses.get(name) != self._node_addresses.get(name)}
            self._node_addresses = addresses
            first = not self.status.addresses_synced
            self.status.addresses_synced = True
        if first or changed:
            self._emit_synced()

    def _nodes_event(self, event_type: str, obj: JSON) -> None:
        name = obj["metadata"]["name"]
        addresses = None if event_type == "DELETED" else node_addresses(obj)
        with self._changed:
            if self._node_addresses.get(name) == addresses:
                return
            if addresses is None:
                self._node_addresses.pop(name, None)
            else:
                self._node_addresses[name] = addresses
            entry = self._peers.get(name)
        if entry is not None:
            self._emit_change(name, entry)

    def _checked(self, entry: tuple[str, RemoteNode | None, str]) -> tuple[str, RemoteNode | None, str]:
        """Must hold the lock. The entry, invalid when its endpoint or node IPs are not its Node's addresses."""
        version, remote, error = entry
        if error or remote is None:
            return entry
        mismatch = address_mismatch(remote, self._node_addresses.get(remote.name))
        return (version, None, mismatch) if mismatch else entry

    # --- peers -----------------------------------------------------------------------------------------------
    def _peers_listed(self, items: list[JSON]) -> None:
        known = self._peers  # only this watch thread replaces it
        parsed = {obj["metadata"]["name"]: self._entry_of(obj, known) for obj in items
                  if obj["metadata"]["name"] != self.node_name}
        with self._changed:
            self._peers = parsed
            own = next((obj for obj in items if obj["metadata"]["name"] == self.node_name), None)
            self._observe_own_object(own)
            self.status.peers_synced = True
        self._emit_synced()
        self._report_publication()

    def _peer_event(self, event_type: str, obj: JSON) -> None:
        name = obj["metadata"]["name"]
        if name == self.node_name:
            with self._changed:
                self._observe_own_object(None if event_type == "DELETED" else obj)
            self._report_publication()
            return
        parsed = None if event_type == "DELETED" else self._entry_of(obj, self._peers)
        with self._changed:
            if parsed is None:
                self._peers.pop(name, None)
            else:
                self._peers[name] = parsed
        self._emit_change(name, parsed)

    def _observe_own_object(self, obj: JSON | None) -> None:
        """Must hold the lock. The echo of one of our own writes is ignored (the writer already holds a copy at
        least as new); any other change (deleted, edited, garbage-collected) makes the writer re-check it."""
        self._own_object_seen = True
        version = obj["metadata"]["resourceVersion"] if obj else None
        if version is not None and version in self._own_write_versions:
            return
        self._own_object = obj
        if self._desired is not None:
            self._desired_generation += 1
            self._changed.notify_all()

    def _emit_synced(self) -> None:
        """Hand the hook the complete set of remote nodes (only once peers and own Node are both listed)."""
        with self._emit_lock:
            with self._changed:
                if not self._delivering():
                    return
                peers = [(name, self._checked(entry)) for name, entry in self._peers.items()]
                opted_out = is_opted_out(self._node)
            nodes: dict[str, RemoteNode] = {}
            invalid: dict[str, str] = {}
            for name, (_, remote, error) in peers:
                if error:
                    invalid[name] = error
                elif remote is not None:
                    nodes[name] = replace(remote, public_key="", next_public_key="") if opted_out else remote
            for name in invalid.keys() - self.status.invalid_objects.keys():
                log.warning("WireguardNode %s ignored: %s", name, invalid[name])
            self.status.invalid_objects = invalid
            self._delivered = set(nodes)
            self.status.remote_nodes = len(nodes)
            self._tell(lambda sink: sink.nodes_synced(nodes))

    def _emit_change(self, name: str, entry: tuple[str, RemoteNode | None, str] | None) -> None:
        """Hand the hook one node's change (a watch event), once the complete list has been handed over."""
        with self._emit_lock:
            with self._changed:
                if not self._delivering():
                    return  # folded into the first complete list
                opted_out = is_opted_out(self._node)
                entry = self._checked(entry) if entry is not None else None
            invalid = dict(self.status.invalid_objects)
            remote = entry[1] if entry is not None and not entry[2] else None
            if entry is not None and entry[2]:
                if name not in invalid:
                    log.warning("WireguardNode %s ignored: %s", name, entry[2])
                invalid[name] = entry[2]
            else:
                invalid.pop(name, None)
            self.status.invalid_objects = invalid
            if remote is None:
                self._tell(lambda sink: sink.node_gone(name))
            else:
                delivered = replace(remote, public_key="", next_public_key="") if opted_out else remote
                self._tell(lambda sink: sink.node_changed(delivered))
            if remote is None:
                self._delivered.discard(name)
            else:
                self._delivered.add(name)
            self.status.remote_nodes = len(self._delivered)

    def _delivering(self) -> bool:
        """Must hold the lock: the hook has a sink and the first lists (peers, own Node, all Nodes) are done."""
        return (self._sink is not None and self.status.peers_synced and self.status.node_synced
                and self.status.addresses_synced)

    def _tell(self, deliver: Callable[[PeerSink], None]) -> None:
        """Must hold the emit lock: deliver to the hook; a failing consumer must not stop the watch."""
        assert self._sink is not None
        try:
            deliver(self._sink)
        except Exception:  # noqa: BLE001 - the next event or relist delivers again
            log.exception("the hook failed to take the remote nodes")

    def _entry_of(self, obj: JSON, known: dict[str, tuple[str, RemoteNode | None, str]]
                ) -> tuple[str, RemoteNode | None, str]:
        """(resourceVersion, RemoteNode or None, "" or why the object is ignored); `known`'s entry when it is of
        the same version (a relist re-parses only what changed)."""
        version = obj["metadata"].get("resourceVersion", "")
        entry = known.get(obj["metadata"]["name"])
        if entry is not None and entry[0] == version:
            return entry
        return (version, *self._parse(obj))

    def _parse(self, obj: JSON) -> tuple[RemoteNode | None, str]:
        """(RemoteNode or None, "" or why the object is ignored)."""
        try:
            return remote_node_from_object(obj, self.settings.max_pod_ips_per_node), ""
        except (ValueError, TypeError) as error:
            return None, str(error) or type(error).__name__

    # --- publishing ------------------------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while True:
            with self._changed:
                while not self._stopping.is_set() and (
                        self._desired is None or self._written_generation == self._desired_generation):
                    self._changed.wait()
                if self._stopping.is_set():
                    return
            if not self._pacer.wait():  # coalesce: whatever is published meanwhile goes into this write
                return
            with self._changed:
                generation = self._desired_generation
                announcement = self._desired
                changed_at = self._pod_ips_changed_at
            assert announcement is not None  # the wait above ends only once there is one; it is never cleared
            try:
                self._write(announcement, changed_at)
            except Exception as error:  # noqa: BLE001 - every failure is retried; the desired state is kept
                if self._stopping.is_set():
                    return
                self.status.write_errors += 1
                self.status.last_error = f"publish: {_describe(error)}"
                with self._changed:
                    self._write_failure = (_failure_kind(error),
                                           f"publishing was refused or failed: {_describe(error)}")
                self._report_publication()
                delay = max(backoff.next_delay(), retry_after(error))
                log.warning("publishing %s failed (%s); retrying in %.1fs", self.node_name, _describe(error), delay)
                self._stopping.wait(delay)
                continue
            backoff.reset()
            with self._changed:
                self._written_generation = generation
                self.status.published = generation == self._desired_generation
                self._write_failure = None
            self._report_publication()

    def _await_write_slot(self) -> None:
        """Sleep until the pacer lets a write go."""
        if not self._pacer.wait():
            raise InterruptedError("stopping")

    def _spend_write(self) -> None:
        self._await_write_slot()
        self._pacer.spend()
        self.status.writes += 1

    def _write(self, announcement: LocalAnnouncement, changed_at: float) -> None:
        with self._changed:
            node = self._node
            own = self._own_object
        if node is None:
            node = self._read_node()
        opted_out = is_opted_out(node)
        key = "" if opted_out else announcement.public_key
        if _annotation(node) != (key or None):
            self._spend_write()
            node = _body(self.core.patch_node(
                self.node_name, {"metadata": {"annotations": {PUBLIC_KEY_ANNOTATION: key or None}}},
                _preload_content=False, _request_timeout=self.settings.request_timeout))
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": node["metadata"]["uid"]}
        for _ in range(self.settings.conflict_retries):
            try:
                if own is None:
                    # The pacing wait before the read, not between it and the write: a copy read and then held
                    # while the pacer waits is stale by the time it is written when another writer is busy.
                    self._await_write_slot()
                    own = self._read_own_object()
                    with self._changed:  # what the API holds now, also when nothing needs writing: a list taken
                        self._own_object = own  # before this node's writes may have been observed after them
                if own is None:
                    # Owned by the Node as it is now: a cached copy may be of a Node deleted meanwhile, and an
                    # object owned by a vanished Node is garbage-collected at once.
                    node = self._read_node()
                    owner["uid"] = node["metadata"]["uid"]
                    self._spend_write()
                    own = _object(self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
                        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                        "metadata": {"name": self.node_name, "labels": MANAGED_BY, "ownerReferences": [owner]},
                    }, _request_timeout=self.settings.request_timeout))
                    self._remember_write(own)
                status = published_status(announcement, opted_out, changed_at, own.get("status"), self.clock(),
                                          self._claims_for(announcement, own))
                if own.get("status") == status:
                    return
                self._spend_write()
                own = _object(self.custom.replace_cluster_custom_object_status(
                    GROUP, VERSION, PLURAL, self.node_name, {**own, "status": status},
                    _request_timeout=self.settings.request_timeout))
                self._remember_write(own)
                return
            except ApiException as error:
                if error.status == 409:  # someone else wrote it (or it was recreated): re-read and retry at once
                    own = None
                    continue
                if error.status == 404:  # deleted under us (e.g. garbage-collected): create it again
                    own = None
                    continue
                raise
        raise RuntimeError(f"WireguardNode {self.node_name}: still conflicting after "
                           f"{self.settings.conflict_retries} attempts")

    def _claims_for(self, announcement: LocalAnnouncement, own: JSON) -> dict[IPNetwork, int]:
        """The claim revision of each pod IP to publish: kept from what this node published before (also before a
        restart: its object says), new ones at the latest revision this node has seen, the API's ordering rather
        than this node's clock."""
        previous = (own.get("status") or {})
        try:
            published = {key: revision for revision, keys in claim_groups(
                previous.get("podIPPrefixes") or [], previous.get("podIPClaimRevisions"),
                self.settings.max_pod_ips_per_node) for key in keys}
        except ValueError:
            published = {}
        seen = max(self._peers_revision(), int(own["metadata"].get("resourceVersion") or 0))
        with self._changed:
            claims = {ip: self._claims.get(ip) or published.get(ip) or seen for ip in announcement.pod_ips}
            self._claims = claims
        return claims

    def _peers_revision(self) -> int:
        """How far this node has seen the WireguardNodes: the latest resourceVersion of their list-watch (0 before
        it started)."""
        return self._peers_watch.revision if self._peers_watch is not None else 0

    def _remember_write(self, obj: JSON) -> None:
        with self._changed:
            self._own_write_versions.append(obj["metadata"]["resourceVersion"])
            self._own_object = obj
            self._own_object_seen = True

    # --- what the API holds ------------------------------------------------------------------------------
    def publication(self) -> Publication:
        """What the API holds of this node's publication and how the latest write stands."""
        with self._changed:
            if not self._own_object_seen:
                return UNKNOWN_PUBLICATION
            status = (self._own_object or {}).get("status") or {}
            key = status.get("publicKey") or ""
            held = held_addresses(status, self.settings.max_pod_ips_per_node)
            try:
                next_key, switch_at = rotation_of(status)
            except ValueError:
                next_key, switch_at = "", 0.0
            if is_opted_out(self._node):
                return Publication("opted-out", key, held)
            if self._desired is not None and self._written_generation == self._desired_generation:
                state, reason = "written", ""
            elif self._write_failure is not None:
                state, reason = self._write_failure
            else:
                state, reason = "pending", ""
            return Publication(state, key, held, reason, next_key, switch_at)

    def _report_publication(self) -> None:
        """Tell the hook what the API holds, when that changed (never under the lock: the hook enqueues). Read under
        the emit lock: a copy read before another thread reported a newer one must not be reported after it."""
        with self._emit_lock:
            publication = self.publication()
            if publication == self._reported or self._sink is None:
                return
            self._reported = publication
            try:
                self._sink.published(publication)
            except Exception:  # noqa: BLE001 - a failing consumer must not stop the sync
                log.exception("the hook failed to take this node's publication")

    def _read_node(self) -> JSON:
        try:
            response = self.core.read_node(self.node_name, _preload_content=False,
                                           _request_timeout=self.settings.request_timeout)
        except ApiException as error:
            if error.status == 404:
                raise _NodeMissing(f"Node {self.node_name} does not exist") from None
            raise
        return _body(response)

    def _read_own_object(self) -> JSON | None:
        try:
            return _object(self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node_name,
                                                                 _request_timeout=self.settings.request_timeout))
        except ApiException as error:
            if error.status == 404:
                return None
            raise


def _body(response: Any) -> JSON:
    """The decoded body of a call made with `_preload_content=False`: the client then answers the raw HTTP
    response, although it declares the model object it would have built."""
    return json.loads(response.data)


def _object(value: object) -> JSON:
    """A custom-object call's answer: the client declares `object`, it is the decoded JSON object."""
    assert isinstance(value, dict)
    return value


def _uid(obj: JSON | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("uid")


def _annotation(node: JSON | None) -> str | None:
    return (((node or {}).get("metadata") or {}).get("annotations") or {}).get(PUBLIC_KEY_ANNOTATION)


def _failure_kind(error: Exception) -> str:
    """denied (the API will refuse the same write again) | unreachable (no answer, or a server error)."""
    if isinstance(error, _NodeMissing) or (isinstance(error, ApiException) and error.status in DENIED_STATUSES):
        return "denied"
    return "unreachable"


def _describe(error: Exception) -> str:
    if isinstance(error, ApiException):
        try:
            message = json.loads(error.body or "{}").get("message") or ""
        except (ValueError, AttributeError):
            message = ""
        return f"API error {error.status} {error.reason}" + (f": {message[:300]}" if message else "")
    if isinstance(error, _NodeMissing):
        return f"{error} (is nodeName / NODE_NAME this node's Node name?)"
    return f"{type(error).__name__}: {error}"
