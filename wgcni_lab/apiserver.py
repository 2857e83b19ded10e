"""A Kubernetes API server for tests and the local lab, faithful where the node hook depends on it.

No real kube-apiserver can run on these machines, so this threaded HTTP server speaks the subset of the API that
`node_hook/cluster.py` uses, well enough that the official `kubernetes` Python client talks to it unchanged
(`Configuration(host="http://127.0.0.1:PORT")`):

- core `nodes` and the cluster-scoped custom resources of the CRD manifests it is given (group/version/plural read
  from the manifest), each with its `/status` subresource;
- one global, monotonically increasing resourceVersion (like etcd's revision) and a bounded event history: a watch or
  an exact list from a resourceVersion older than the history answers 410 Gone, as a compacted etcd does;
- list (optionally `resourceVersionMatch=Exact`), watch as chunked JSON lines with `allowWatchBookmarks` (BOOKMARK
  events), `timeoutSeconds`, `fieldSelector=metadata.name=...` and equality label selectors;
- create / update (PUT) / patch (JSON patch, merge patch, strategic merge patch for the lists the hook uses) /
  delete, with optimistic concurrency on `metadata.resourceVersion` (409 Conflict), 404 and 409 Status objects
  shaped like the real ones, and status/spec separation for resources with a status subresource;
- garbage collection of dependents: deleting an object deletes every object whose only owner it was (like the
  real garbage collector with background propagation, synchronously);
- fault injection: the next N matching requests fail with a chosen code, a per-request delay, cutting every watch
  stream, compacting the history, and a restart that drops every connection and all watch state.

Not implemented because the hook does not use them: namespaced resources, pagination (`limit` is ignored and no
`continue` token is returned, as the real watch cache does for resourceVersion=0), server-side apply, schema
validation, authentication.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import errno
import json
import re
import logging
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

JSON = dict[str, Any]
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class ResourceType:
    """One cluster-scoped resource the server serves."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    has_status: bool = True
    reset_status_on_create: bool = True  # custom resources with a status subresource drop status on create
    tracks_generation: bool = True
    return_deleted_object: bool = True  # custom resources answer DELETE with the object, nodes with a Status

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_name(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


NODES = ResourceType(
    group="", version="v1", plural="nodes", kind="Node",
    reset_status_on_create=False, tracks_generation=False, return_deleted_object=False,
)


def resource_types_from_crd(crd: JSON) -> list[ResourceType]:
    """Every served version of a CustomResourceDefinition manifest (apiextensions.k8s.io/v1) as a ResourceType."""
    spec = crd["spec"]
    if spec.get("scope") != "Cluster":
        raise ValueError(f"CRD {crd['metadata']['name']}: only cluster-scoped resources are supported")
    types = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        types.append(ResourceType(
            group=spec["group"], version=version["name"], plural=spec["names"]["plural"],
            kind=spec["names"]["kind"], has_status="status" in (version.get("subresources") or {}),
        ))
    return types


class ApiError(Exception):
    """An error answered as a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.qualified_name} "{name}" not found',
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def _conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409, "Conflict",
        f'Operation cannot be fulfilled on {rtype.qualified_name} "{name}": {why}',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def _gone(resource_version: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {resource_version}")


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    """One change in the store's history."""

    resource_version: int
    rtype: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    object: JSON
    previous: JSON | None  # the object before the change (None for ADDED), to rebuild past states


@dataclass
class Fault:
    """Fail the next `remaining` requests that match with `code`."""

    remaining: int
    code: int
    methods: frozenset[str] | None
    path_contains: str | None
    user_agent_prefix: str | None
    user_agent: str | None = None  # exactly this User-Agent (one hook: `wgcni-node/<node>`)

    def matches(self, method: str, path: str, user_agent: str) -> bool:
        return ((self.methods is None or method in self.methods)
                and (self.path_contains is None or self.path_contains in path)
                and (self.user_agent_prefix is None or user_agent.startswith(self.user_agent_prefix))
                and (self.user_agent is None or user_agent == self.user_agent))


@dataclass
class RequestRecord:
    """What a test can inspect about a request the server answered."""

    method: str
    path: str
    code: int
    at: float
    watch: bool = False


class LabelSelector:
    """Equality-based label selector: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated (all must hold)."""

    _term = re.compile(r"^(!?)([A-Za-z0-9./_-]+)(?:(==|=|!=)([A-Za-z0-9._-]*))?$")

    def __init__(self, text: str):
        self.terms: list[tuple[str, str, str | None]] = []
        for raw in filter(None, (part.strip() for part in text.split(","))):
            match = self._term.match(raw)
            if not match or (match.group(1) and match.group(3)):
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {raw!r}")
            negated, key, operator, value = match.groups()
            if operator is None:
                self.terms.append(("absent" if negated else "exists", key, None))
            else:
                self.terms.append(("ne" if operator == "!=" else "eq", key, value))

    def matches(self, obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for kind, key, value in self.terms:
            if kind == "exists" and key not in labels:
                return False
            if kind == "absent" and key in labels:
                return False
            if kind == "eq" and labels.get(key) != value:
                return False
            if kind == "ne" and labels.get(key) == value:
                return False
        return True


@dataclass
class Selection:
    """Which objects of a type a list or watch sees."""

    name: str | None = None
    labels: LabelSelector | None = None

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Selection:
        name = None
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            key, _, value = term.partition("=")
            value = value.lstrip("=")
            if key != "metadata.name" or not value:
                raise ApiError(400, "BadRequest", f'field label not supported: "{term}"')
            name = value
        labels = LabelSelector(query["labelSelector"]) if query.get("labelSelector") else None
        return cls(name=name, labels=labels)

    def matches(self, obj: JSON) -> bool:
        if self.name is not None and obj["metadata"]["name"] != self.name:
            return False
        return self.labels is None or self.labels.matches(obj)


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# Lists that a strategic merge patch merges by key instead of replacing (the ones the hook's objects carry).
STRATEGIC_MERGE_KEYS = {("metadata", "ownerReferences"): "uid", ("status", "conditions"): "type",
                        ("status", "addresses"): "type"}


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Strategic merge patch as the API server applies it to the fields listed in STRATEGIC_MERGE_KEYS; elsewhere
    it behaves as a JSON merge patch (which is what it does for lists without a merge key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if "$patch" in patch or any(key.startswith("$") for key in patch):
        raise ApiError(400, "BadRequest", "strategic merge patch directives are not supported by this server")
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        child = path + (key,)
        if value is None:
            result.pop(key, None)
        elif child in STRATEGIC_MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            merge_key = STRATEGIC_MERGE_KEYS[child]
            merged = {item.get(merge_key): item for item in result[key]}
            order = [item.get(merge_key) for item in result[key]]
            for item in value:
                identity = item.get(merge_key)
                if identity not in merged:
                    order.append(identity)
                merged[identity] = strategic_merge_patch(merged.get(identity), item, child)
            result[key] = [merged[identity] for identity in order]
        else:
            result[key] = strategic_merge_patch(result.get(key), value, child)
    return result


def _pointer_parts(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {pointer!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _pointer_parent(document: Any, parts: list[str]) -> tuple[Any, str]:
    node = document
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist") from None
    return node, parts[-1]


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902 (add, remove, replace, test, move, copy), applied to a copy; a failing op rejects the whole patch."""
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    result = copy.deepcopy(document)

    def get(parts: list[str]) -> Any:
        if not parts:
            return result
        parent, last = _pointer_parent(result, parts)
        try:
            return parent[int(last)] if isinstance(parent, list) else parent[last]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist") from None

    def remove(parts: list[str]) -> Any:
        parent, last = _pointer_parent(result, parts)
        try:
            return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist") from None

    def add(parts: list[str], value: Any, replace: bool) -> None:
        nonlocal result
        if not parts:
            result = value
            return
        parent, last = _pointer_parent(result, parts)
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
            if not 0 <= index <= len(parent) - (1 if replace else 0):
                raise ApiError(422, "Invalid", f"JSON patch index {last!r} out of range")
            if replace:
                parent[index] = value
            else:
                parent.insert(index, value)
        elif isinstance(parent, dict):
            if replace and last not in parent:
                raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist")
            parent[last] = value
        else:
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist")

    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise ApiError(400, "BadRequest", f"malformed JSON patch operation {operation!r}")
        op, parts = operation["op"], _pointer_parts(operation["path"])
        if op == "add":
            add(parts, copy.deepcopy(operation.get("value")), replace=False)
        elif op == "replace":
            add(parts, copy.deepcopy(operation.get("value")), replace=True)
        elif op == "remove":
            remove(parts)
        elif op == "test":
            if get(parts) != operation.get("value"):
                raise ApiError(422, "Invalid", f"JSON patch test failed at {operation['path']}")
        elif op in ("move", "copy"):
            source = _pointer_parts(operation.get("from", ""))
            value = remove(source) if op == "move" else copy.deepcopy(get(source))
            add(parts, value, replace=False)
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch operation {op!r}")
    return result


class Store:
    """The objects, the global resourceVersion and the event history (what etcd plus the watch cache hold)."""

    def __init__(self, resource_types: list[ResourceType], history_window: int):
        self.types = {(rtype.group, rtype.version, rtype.plural): rtype for rtype in resource_types}
        self.objects: dict[tuple[str, str], JSON] = {}  # (qualified name, object name) -> object
        self.resource_version = 1
        self.history: list[Event] = []
        self.oldest_watchable = 1  # a watch from a resourceVersion below this is 410 Gone
        self.history_window = history_window
        self.changed = threading.Condition()

    # --- reads -------------------------------------------------------------------------------------------------
    def get(self, rtype: ResourceType, name: str) -> JSON:
        with self.changed:
            obj = self.objects.get((rtype.qualified_name, name))
            if obj is None:
                raise _not_found(rtype, name)
            return copy.deepcopy(obj)

    def list(self, rtype: ResourceType, selection: Selection, exact_version: int | None) -> tuple[list[JSON], int]:
        with self.changed:
            if exact_version is None or exact_version == self.resource_version:
                items = [obj for (qualified, _), obj in self.objects.items() if qualified == rtype.qualified_name]
                version = self.resource_version
            else:
                items = self._state_at(rtype, exact_version)
                version = exact_version
            selected = [copy.deepcopy(obj) for obj in items if selection.matches(obj)]
        selected.sort(key=lambda obj: obj["metadata"]["name"])
        return selected, version

    def _state_at(self, rtype: ResourceType, version: int) -> list[JSON]:
        """The objects of a type as they were at `version`, rebuilt by undoing newer history."""
        if version < self.oldest_watchable - 1 or version > self.resource_version:
            raise _gone(version) if version < self.resource_version else ApiError(
                504, "Timeout", f"Too large resource version: {version}, current: {self.resource_version}")
        state = {name: obj for (qualified, name), obj in self.objects.items() if qualified == rtype.qualified_name}
        for event in reversed(self.history):
            if event.resource_version <= version:
                break
            if event.rtype.qualified_name != rtype.qualified_name:
                continue
            name = event.object["metadata"]["name"]
            if event.previous is None:
                state.pop(name, None)
            else:
                state[name] = event.previous
        return list(state.values())

    # --- writes ------------------------------------------------------------------------------------------------
    def _record(self, rtype: ResourceType, event_type: str, obj: JSON, previous: JSON | None) -> None:
        """Must hold the lock. Gives `obj` the next resourceVersion and appends the event."""
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        self.history.append(Event(self.resource_version, rtype, event_type, copy.deepcopy(obj), previous))
        overflow = len(self.history) - self.history_window
        if overflow > 0:
            del self.history[:overflow]
            self.oldest_watchable = self.history[0].resource_version
        self.changed.notify_all()

    def create(self, rtype: ResourceType, body: JSON) -> JSON:
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{rtype.kind} is invalid: metadata.name: Required value: name is required")
        if obj.get("kind") not in (None, rtype.kind) or obj.get("apiVersion") not in (None, rtype.api_version):
            raise ApiError(400, "BadRequest", f"the body is a {obj.get('apiVersion')}/{obj.get('kind')}, "
                                              f"not a {rtype.api_version}/{rtype.kind}")
        obj["kind"], obj["apiVersion"] = rtype.kind, rtype.api_version
        if rtype.has_status and rtype.reset_status_on_create:
            obj.pop("status", None)
        if metadata.get("resourceVersion"):
            raise ApiError(422, "Invalid", "metadata.resourceVersion must not be set on create")
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now_rfc3339()
        if rtype.tracks_generation:
            metadata["generation"] = 1
        for dropped in ("deletionTimestamp", "selfLink"):
            metadata.pop(dropped, None)
        with self.changed:
            key = (rtype.qualified_name, name)
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{rtype.qualified_name} "{name}" already exists',
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
            self._record(rtype, "ADDED", obj, None)
            self.objects[key] = obj
            created = copy.deepcopy(obj)
            self._collect_orphan(rtype, key)
            return created

    def update(self, rtype: ResourceType, name: str, body: JSON, subresource: str | None,
               expected_version: str | None) -> JSON:
        """Replace an object (or its status); `expected_version` is the precondition ("" / None = unconditional)."""
        with self.changed:
            key = (rtype.qualified_name, name)
            current = self.objects.get(key)
            if current is None:
                raise _not_found(rtype, name)
            if expected_version and expected_version != current["metadata"]["resourceVersion"]:
                raise _conflict(rtype, name, "the object has been modified; please apply your changes to the "
                                             "latest version and try again")
            if (body.get("metadata") or {}).get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            updated = self._merge_update(rtype, current, copy.deepcopy(body), subresource)
            if updated == current:
                return copy.deepcopy(current)  # a no-op write keeps the resourceVersion, as the real server does
            previous = copy.deepcopy(current)
            self._record(rtype, "MODIFIED", updated, previous)
            self.objects[key] = updated
            result = copy.deepcopy(updated)
            self._collect_orphan(rtype, key)
            return result

    @staticmethod
    def _merge_update(rtype: ResourceType, current: JSON, body: JSON, subresource: str | None) -> JSON:
        """What the object becomes: the status subresource changes only status, the main resource all but status;
        system metadata is kept from the stored object."""
        if subresource == "status":
            updated = copy.deepcopy(current)
            if "status" in body:
                updated["status"] = body["status"]
            else:
                updated.pop("status", None)
            return updated
        updated = body
        updated["kind"], updated["apiVersion"] = rtype.kind, rtype.api_version
        metadata = updated.setdefault("metadata", {})
        for kept in ("uid", "creationTimestamp", "resourceVersion", "generation", "name"):
            if kept in current["metadata"]:
                metadata[kept] = current["metadata"][kept]
        if rtype.has_status:
            if "status" in current:
                updated["status"] = current["status"]
            else:
                updated.pop("status", None)
        if rtype.tracks_generation:
            before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
            after = {k: v for k, v in updated.items() if k not in ("metadata", "status")}
            if before != after:
                metadata["generation"] = current["metadata"].get("generation", 1) + 1
        return updated

    def patch(self, rtype: ResourceType, name: str, content_type: str, patch: Any, subresource: str | None) -> JSON:
        with self.changed:
            current = self.get(rtype, name)
            if content_type == "application/json-patch+json":
                patched = json_patch(current, patch)
            elif content_type == "application/merge-patch+json":
                patched = json_merge_patch(current, patch)
            elif content_type == "application/strategic-merge-patch+json":
                if rtype.group:
                    raise ApiError(415, "UnsupportedMediaType",
                                   "strategic merge patch is not supported for custom resources")
                patched = strategic_merge_patch(current, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                            f"accepted media types include: application/json-patch"
                                                            f"+json, application/merge-patch+json")
            if not isinstance(patched, dict):
                raise ApiError(422, "Invalid", "the patched document is not an object")
            # A resourceVersion in the patch is a precondition; otherwise the patch applies to the latest object.
            wanted = (patched.get("metadata") or {}).get("resourceVersion")
            return self.update(rtype, name, patched, subresource, wanted)

    def delete(self, rtype: ResourceType, name: str, preconditions: JSON) -> JSON:
        with self.changed:
            key = (rtype.qualified_name, name)
            current = self.objects.get(key)
            if current is None:
                raise _not_found(rtype, name)
            if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
                raise _conflict(rtype, name, f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                                             f"UID in object meta: {current['metadata']['uid']}")
            wanted = preconditions.get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise _conflict(rtype, name, f"Precondition failed: ResourceVersion in precondition: {wanted}, "
                                             f"ResourceVersion in object meta: "
                                             f"{current['metadata']['resourceVersion']}")
            deleted = self._delete_locked(rtype, key)
            self._collect_garbage(deleted["metadata"]["uid"])
            return deleted

    def _delete_locked(self, rtype: ResourceType, key: tuple[str, str]) -> JSON:
        current = self.objects.pop(key)
        previous = copy.deepcopy(current)
        self._record(rtype, "DELETED", current, previous)
        return copy.deepcopy(current)

    def _collect_garbage(self, owner_uid: str) -> None:
        """Must hold the lock. Drop the owner from its dependents; delete those left without owners (cascading)."""
        by_qualified = {rtype.qualified_name: rtype for rtype in self.types.values()}
        pending = [owner_uid]
        while pending:
            uid = pending.pop()
            for key, obj in list(self.objects.items()):
                references = obj["metadata"].get("ownerReferences") or []
                if not any(reference.get("uid") == uid for reference in references):
                    continue
                remaining = [reference for reference in references if reference.get("uid") != uid]
                rtype = by_qualified[key[0]]
                if remaining:
                    previous = copy.deepcopy(obj)
                    obj["metadata"]["ownerReferences"] = remaining
                    self._record(rtype, "MODIFIED", obj, previous)
                else:
                    pending.append(self._delete_locked(rtype, key)["metadata"]["uid"])

    def _collect_orphan(self, rtype: ResourceType, key: tuple[str, str]) -> None:
        """Must hold the lock. An object whose owner references all name objects that do not exist is deleted,
        as the garbage collector does when it sees a dependent of a vanished owner."""
        references = self.objects[key]["metadata"].get("ownerReferences") or []
        if not references:
            return
        live = {obj["metadata"]["uid"] for obj in self.objects.values()}
        if not any(reference.get("uid") in live for reference in references):
            deleted = self._delete_locked(rtype, key)
            self._collect_garbage(deleted["metadata"]["uid"])

    def compact(self) -> None:
        """Forget the whole history: every watch or exact list from an older resourceVersion gets 410 Gone."""
        with self.changed:
            self.history.clear()
            self.oldest_watchable = self.resource_version + 1
            self.changed.notify_all()


class Watcher:
    """One watch stream's position in the history; `next()` blocks for the next event, a bookmark or the end."""

    def __init__(self, store: Store, rtype: ResourceType, selection: Selection, since: int | None,
                 bookmarks: bool, bookmark_interval: float):
        self.store, self.rtype, self.selection = store, rtype, selection
        self.bookmarks, self.bookmark_interval = bookmarks, bookmark_interval
        self.cancelled = False
        self.pending: list[JSON] = []
        with store.changed:
            if since is None:
                # No resourceVersion (or "0"): synthetic ADDED events for the current state, then changes.
                items, _ = store.list(rtype, selection, None)
                self.pending = [{"type": "ADDED", "object": obj} for obj in items]
                self.position = store.resource_version
            elif since < store.oldest_watchable - 1:
                raise _gone(since)
            else:
                self.position = since

    def next(self, deadline: float) -> JSON | None:
        """The next event to send, or None at the deadline or when cancelled. May raise ApiError(410)."""
        if self.pending:
            return self.pending.pop(0)
        store = self.store
        last_sent = time.monotonic()
        with store.changed:
            while not self.cancelled:
                if self.position < store.oldest_watchable - 1:
                    raise _gone(self.position)
                events = self._events_after_position()
                if events:
                    self.pending = events[1:]
                    return events[0]
                now = time.monotonic()
                if now >= deadline:
                    return None
                if self.bookmarks and now - last_sent >= self.bookmark_interval:
                    # Everything up to the current revision has been sent: that revision is safe to resume from.
                    self.position = store.resource_version
                    return {"type": "BOOKMARK", "object": {
                        "kind": self.rtype.kind, "apiVersion": self.rtype.api_version,
                        "metadata": {"resourceVersion": str(self.position)}}}
                wait = deadline - now
                if self.bookmarks:
                    wait = min(wait, self.bookmark_interval - (now - last_sent))
                store.changed.wait(max(wait, 0.001))
        return None

    def _events_after_position(self) -> list[JSON]:
        """Must hold the lock."""
        history = self.store.history
        low, high = 0, len(history)
        while low < high:  # first event newer than the position
            middle = (low + high) // 2
            if history[middle].resource_version <= self.position:
                low = middle + 1
            else:
                high = middle
        events = []
        for event in history[low:]:
            self.position = event.resource_version
            if event.rtype.qualified_name == self.rtype.qualified_name and self.selection.matches(event.object):
                events.append({"type": event.type, "object": copy.deepcopy(event.object)})
        return events

    def cancel(self) -> None:
        with self.store.changed:
            self.cancelled = True
            self.store.changed.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle plus the client's delayed ACK adds
        # ~40 ms to every answer (measured: 45 ms per PATCH before, 0.65 ms after).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.api.track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api.track_connection(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Requests are recorded in ApiServer.requests instead of printed."""

    def do_GET(self) -> None:
        self.server.api.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.api.handle(self, "POST")

    def do_PUT(self) -> None:
        self.server.api.handle(self, "PUT")

    def do_PATCH(self) -> None:
        self.server.api.handle(self, "PATCH")

    def do_DELETE(self) -> None:
        self.server.api.handle(self, "DELETE")

    def send_json(self, code: int, body: JSON) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def consume_body(self) -> None:
        """Read the request body off the connection before anything is answered (keep-alive stays in sync)."""
        length = int(self.headers.get("Content-Length") or 0)
        self.raw_body = self.rfile.read(length) if length else b""

    def read_body(self) -> Any:
        raw = self.raw_body
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not valid JSON") from None

    def read_object(self) -> dict[str, Any]:
        """The body of a create or an update: a JSON object."""
        body = self.read_body()
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be an object")
        return body


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], api: ApiServer):
        self.api = api
        self.listener: NamespacedListener | None = None  # set when it serves inside another network namespace
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connections cut by fault injection, restarts or clients going away are normal here; anything else is
        logged (the base class would print a traceback to stderr)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)) or (
                isinstance(error, OSError) and error.errno in (errno.EBADF, errno.ENOTCONN)):
            return
        log.exception("test API server: error while serving %s", client_address)


@dataclass(frozen=True)
class NamespacedListener:
    """An extra address to serve on inside another network namespace (e.g. the lab's VNet, so that hooks running
    in node namespaces reach the server while the test process talks to it on loopback)."""

    netns: str  # a name under /run/netns or a path
    host: str
    port: int


def _bind_in_namespace(listener: NamespacedListener, api: ApiServer) -> _HttpServer:
    """Create the listening socket inside `listener.netns`: setns() applies to the calling thread only, so the
    bind happens on a short-lived thread; the socket stays in that namespace whoever serves it."""
    result: list[_HttpServer | BaseException] = []

    def bind() -> None:
        try:
            path = listener.netns if "/" in listener.netns else f"/run/netns/{listener.netns}"
            with open(path) as namespace:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {path} failed")
            http = _HttpServer((listener.host, listener.port), api)
            http.listener = listener
            result.append(http)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            result.append(error)

    thread = threading.Thread(target=bind, name="apiserver-bind")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@dataclass
class ApiServer:
    """The test API server. Use as a context manager or call start()/stop(); `url` is what the client's
    Configuration.host takes. `also_listen` serves the same store in other network namespaces too."""

    crds: list[JSON] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    history_window: int = 10_000
    bookmark_interval: float = 1.0
    default_watch_timeout: float = 1800.0
    also_listen: list[NamespacedListener] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(listener.port == 0 for listener in self.also_listen):
            raise ValueError("a namespaced listener needs a fixed port (it must stay the same across restarts)")
        types = [NODES] + [rtype for crd in self.crds for rtype in resource_types_from_crd(crd)]
        self.store = Store(types, self.history_window)
        self.requests: collections.deque[RequestRecord] = collections.deque(maxlen=100_000)
        self._faults: list[Fault] = []
        self._delay = 0.0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._watchers: set[Watcher] = set()
        self._servers: list[tuple[_HttpServer, threading.Thread]] = []

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> ApiServer:
        try:
            primary = _HttpServer((self.host, self.port), self)
            self.port = primary.server_address[1]
            self._serve(primary)
            for listener in self.also_listen:
                self._serve(_bind_in_namespace(listener, self))
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self, http: _HttpServer) -> None:
        thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"apiserver:{http.server_address[1]}", daemon=True)
        thread.start()
        self._servers.append((http, thread))

    def add_listener(self, listener: NamespacedListener) -> None:
        """Serve in one more network namespace from now on (a node that joins, or comes back after a reboot)."""
        if listener.port == 0:
            raise ValueError("a namespaced listener needs a fixed port (it must stay the same across restarts)")
        self._serve(_bind_in_namespace(listener, self))
        self.also_listen.append(listener)

    def remove_listener(self, netns: str) -> None:
        """Stop serving in `netns` and close its listening socket (which would keep the namespace alive)."""
        self.also_listen = [listener for listener in self.also_listen if listener.netns != netns]
        for http, thread in list(self._servers):
            if http.listener is not None and http.listener.netns == netns:
                http.shutdown()
                http.server_close()
                thread.join()
                self._servers.remove((http, thread))

    def stop(self) -> None:
        for http, thread in self._servers:
            http.shutdown()
            http.server_close()
            thread.join()
        self._servers.clear()
        self.cut_watches()
        self.drop_connections()

    def restart(self, downtime: float = 0.0, compact: bool = True) -> None:
        """Stop listening, drop every connection and watch, optionally wait, listen again on the same port.
        With `compact` the history is lost too (a watch resuming from before the restart gets 410 Gone)."""
        self.stop()
        if compact:
            self.store.compact()
        if downtime:
            time.sleep(downtime)
        self.start()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- fault injection ---------------------------------------------------------------------------------------
    def fail_next(self, count: int = 1, code: int = 500, methods: set[str] | None = None,
                  path_contains: str | None = None, user_agent_prefix: str | None = None,
                  user_agent: str | None = None) -> None:
        """The next `count` requests with one of `methods` whose path contains `path_contains` and whose
        User-Agent starts with `user_agent_prefix` (e.g. only the hooks', not the test's own client) or is exactly
        `user_agent` (one hook's) get `code`."""
        with self._lock:
            self._faults.append(Fault(count, code, frozenset(methods) if methods else None, path_contains,
                                      user_agent_prefix, user_agent))

    def pending_faults(self) -> int:
        """Injected failures not served yet."""
        with self._lock:
            return sum(fault.remaining for fault in self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delay = 0.0

    def set_delay(self, seconds: float) -> None:
        """Every request waits this long before it is handled."""
        self._delay = seconds

    def cut_watches(self) -> None:
        """Abort every open watch stream mid-stream (no terminating chunk), as a dropped connection does."""
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.cancel()

    def drop_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def compact(self) -> None:
        self.store.compact()

    def track_connection(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def writes(self, path_contains: str = "", since: float = 0.0) -> list[RequestRecord]:
        """Successful writes (POST/PUT/PATCH/DELETE) whose path contains `path_contains`, answered after `since`."""
        with self._lock:
            return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")
                    and path_contains in r.path and r.code < 300 and r.at >= since]

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watchers)

    # --- request handling --------------------------------------------------------------------------------------
    def handle(self, request: _Handler, method: str) -> None:
        url = urlsplit(request.path)
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        is_watch = method == "GET" and query.get("watch") in ("true", "1")
        code = 500
        request.consume_body()
        try:
            if self._delay:
                time.sleep(self._delay)
            fault = self._take_fault(method, url.path, request.headers.get("User-Agent") or "")
            if fault is not None:
                raise ApiError(fault, HTTPStatus(fault).phrase.replace(" ", ""),
                               f"injected fault: {fault} {HTTPStatus(fault).phrase}")
            if url.path == "/version":
                code = 200
                request.send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-wgcni-test"})
                return
            rtype, name, subresource = self._route(url.path)
            if is_watch:
                code = 200
                self._record(method, url.path, code, is_watch)  # now: a watch may stay open for a long time
                self._serve_watch(request, rtype, query)
                return
            code, body = self._dispatch(request, method, rtype, name, subresource, query)
            request.send_json(code, body)
        except ApiError as error:
            code = error.code
            request.send_json(error.code, error.status())
        except (BrokenPipeError, ConnectionResetError):
            request.close_connection = True
        finally:
            if not (is_watch and code == 200):
                self._record(method, url.path, code, is_watch)

    def _record(self, method: str, path: str, code: int, is_watch: bool) -> None:
        with self._lock:
            self.requests.append(RequestRecord(method, path, code, time.monotonic(), is_watch))

    def _take_fault(self, method: str, path: str, user_agent: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(method, path, user_agent):
                    fault.remaining -= 1
                    return fault.code
            self._faults = [fault for fault in self._faults if fault.remaining > 0]
        return None

    def _route(self, path: str) -> tuple[ResourceType, str | None, str | None]:
        parts = [part for part in path.split("/") if part]
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rtype = self.store.types.get((group, version, rest[0]))
        if rtype is None or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else None
        if subresource is not None and (subresource != "status" or not rtype.has_status):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rtype, name, subresource

    def _dispatch(self, request: _Handler, method: str, rtype: ResourceType, name: str | None,
                  subresource: str | None, query: dict[str, str]) -> tuple[int, JSON]:
        store = self.store
        if name is None:
            if method == "GET":
                return 200, self._list(rtype, query)
            if method == "POST":
                return 201, store.create(rtype, request.read_object())
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection here")
        if method == "GET":
            return 200, store.get(rtype, name)
        if method == "PUT":
            body = request.read_object()
            expected = (body.get("metadata") or {}).get("resourceVersion")
            return 200, store.update(rtype, name, body, subresource, expected)
        if method == "PATCH":
            content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
            return 200, store.patch(rtype, name, content_type, request.read_body(), subresource)
        if method == "DELETE" and subresource is None:
            options = request.read_body() or {}
            deleted = store.delete(rtype, name, options.get("preconditions") or {})
            if rtype.return_deleted_object:
                return 200, deleted
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": rtype.group, "kind": rtype.plural,
                                     "uid": deleted["metadata"]["uid"]}}
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _list(self, rtype: ResourceType, query: dict[str, str]) -> JSON:
        selection = Selection.from_query(query)
        exact = None
        if query.get("resourceVersionMatch") == "Exact":
            exact = self._parse_version(query.get("resourceVersion", ""))
            if exact is None:
                raise ApiError(400, "BadRequest", "resourceVersionMatch=Exact needs a resourceVersion")
        items, version = self.store.list(rtype, selection, exact)
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                "metadata": {"resourceVersion": str(version)}, "items": items}

    @staticmethod
    def _parse_version(text: str) -> int | None:
        if text in ("", "0"):
            return None
        if not text.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}")
        return int(text)

    def _serve_watch(self, request: _Handler, rtype: ResourceType, query: dict[str, str]) -> None:
        selection = Selection.from_query(query)
        since = self._parse_version(query.get("resourceVersion", ""))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else self.default_watch_timeout
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()

        def send(event: JSON) -> None:
            data = json.dumps(event).encode() + b"\n"
            request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            request.wfile.flush()

        watcher = None
        try:
            watcher = Watcher(self.store, rtype, selection, since, bookmarks, self.bookmark_interval)
            with self._lock:
                self._watchers.add(watcher)
            while True:
                event = watcher.next(deadline)
                if event is None:
                    break
                send(event)
        except ApiError as error:  # 410 inside the stream, as the real server sends it
            send({"type": "ERROR", "object": error.status()})
        finally:
            if watcher is not None:
                with self._lock:
                    self._watchers.discard(watcher)
        if watcher is not None and watcher.cancelled:
            # A cut stream: no terminating chunk, and the connection goes away under the client.
            request.close_connection = True
            try:
                request.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        request.wfile.write(b"0\r\n\r\n")
        request.wfile.flush()
