"""The in-memory store: objects, one global resourceVersion, the bounded event history, and what the garbage
collector (a thread of the server) works through."""

from __future__ import annotations

import builtins
import copy
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wgcni_lab.apiserver.errors import ApiError, conflict, gone, not_found
from wgcni_lab.apiserver.patch import json_merge_patch, json_patch, strategic_merge_patch
from wgcni_lab.apiserver.resources import (
    DEFAULT_NAMESPACES,
    JSON,
    NAMESPACES,
    ResourceType,
    resource_types_from_crd,
)
from wgcni_lab.apiserver.selectors import Selection

CRD_QUALIFIED_NAME = "customresourcedefinitions.apiextensions.k8s.io"
Key = tuple[str, str, str]  # (qualified resource name, namespace or "", name)
# Called inside a write, before it is stored: (operation, type, old object or None, new object, subresource) ->
# the object to store (pruned, validated), or an ApiError. CREATE | UPDATE | DELETE, as admission names them.
Admit = Callable[[str, ResourceType, "JSON | None", JSON, "str | None"], JSON]


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _admit_all(operation: str, rtype: ResourceType, old: JSON | None, new: JSON, subresource: str | None) -> JSON:
    return new


@dataclass
class Event:
    """One change in the store's history."""

    resource_version: int
    rtype: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    object: JSON
    previous: JSON | None  # the object before the change (None for ADDED), to rebuild past states


def _order(obj: JSON) -> tuple[str, str]:
    """Where an object comes in a list: by namespace, then name."""
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _key(rtype: ResourceType, namespace: str, name: str) -> Key:
    return (rtype.qualified_name, namespace if rtype.namespaced else "", name)


class Store:
    """The objects, the global resourceVersion and the event history (what etcd plus the watch cache hold)."""

    def __init__(self, resource_types: list[ResourceType], history_window: int):
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rtype in resource_types:
            self.register(rtype)
        self.objects: dict[Key, JSON] = {}
        self.resource_version = 1
        self.history: list[Event] = []
        self.oldest_watchable = 1  # a watch from a resourceVersion below this is 410 Gone
        self.history_window = history_window
        self.changed = threading.Condition()
        # What the garbage collector has to look at (asynchronously, as the real one, see collect_garbage): the
        # uids of deleted owners, and objects written with owner references.
        self.gc_owners: builtins.list[str] = []
        self.gc_dependents: builtins.list[Key] = []
        for namespace in DEFAULT_NAMESPACES:
            self.create(NAMESPACES, {"metadata": {"name": namespace}, "status": {"phase": "Active"}})

    def register(self, rtype: ResourceType) -> None:
        """Serve one more type from now on (a CustomResourceDefinition created or updated)."""
        self.types[(rtype.group, rtype.version, rtype.plural)] = rtype

    def type_of(self, qualified_name: str) -> ResourceType:
        return next(rtype for rtype in self.types.values() if rtype.qualified_name == qualified_name)

    # --- reads -------------------------------------------------------------------------------------------------
    def get(self, rtype: ResourceType, name: str, namespace: str = "") -> JSON:
        with self.changed:
            obj = self.objects.get(_key(rtype, namespace, name))
            if obj is None:
                raise not_found(rtype, name)
            return copy.deepcopy(obj)

    def find(self, rtype: ResourceType, name: str, namespace: str = "") -> JSON | None:
        """The stored object itself (not a copy) or None; for the server's own readers (RBAC, admission)."""
        return self.objects.get(_key(rtype, namespace, name))

    def list(self, rtype: ResourceType, selection: Selection, exact_version: int | None,
             after: tuple[str, str] | None = None, limit: int = 0) -> tuple[builtins.list[JSON], int, int]:
        """(objects in (namespace, name) order, the resourceVersion they are at, how many more there are): those
        after `after`, at most `limit` (0: all) - only those are copied, as the real server reads only a page."""
        with self.changed:
            if exact_version is None or exact_version == self.resource_version:
                items = [obj for key, obj in self.objects.items() if key[0] == rtype.qualified_name]
                version = self.resource_version
            else:
                items = self._state_at(rtype, exact_version)
                version = exact_version
            selected = sorted((obj for obj in items if selection.matches(obj)), key=_order)
            if after is not None:
                selected = [obj for obj in selected if _order(obj) > after]
            remaining = max(0, len(selected) - limit) if limit else 0
            page = [copy.deepcopy(obj) for obj in (selected[:limit] if limit else selected)]
        return page, version, remaining

    def items_of(self, qualified_name: str) -> builtins.list[JSON]:
        """Must hold the lock. The stored objects of one type (not copies), for the server's own readers."""
        return [obj for key, obj in self.objects.items() if key[0] == qualified_name]

    def _state_at(self, rtype: ResourceType, version: int) -> builtins.list[JSON]:
        """The objects of a type as they were at `version`, rebuilt by undoing newer history."""
        if version < self.oldest_watchable - 1 or version > self.resource_version:
            raise gone(version) if version < self.resource_version else ApiError(
                504, "Timeout", f"Too large resource version: {version}, current: {self.resource_version}")
        state = {key: obj for key, obj in self.objects.items() if key[0] == rtype.qualified_name}
        for event in reversed(self.history):
            if event.resource_version <= version:
                break
            if event.rtype.qualified_name != rtype.qualified_name:
                continue
            metadata = event.object["metadata"]
            key = _key(rtype, metadata.get("namespace", ""), metadata["name"])
            if event.previous is None:
                state.pop(key, None)
            else:
                state[key] = event.previous
        return builtins.list(state.values())

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
        if rtype.qualified_name == CRD_QUALIFIED_NAME and event_type != "DELETED":
            for served in resource_types_from_crd(obj):
                self.register(served)

    def create(self, rtype: ResourceType, body: JSON, namespace: str = "", admit: Admit = _admit_all) -> JSON:
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{rtype.kind} is invalid: metadata.name: Required value: name is required")
        if obj.get("kind") not in (None, rtype.kind) or obj.get("apiVersion") not in (None, rtype.api_version):
            raise ApiError(400, "BadRequest", f"the body is a {obj.get('apiVersion')}/{obj.get('kind')}, "
                                              f"not a {rtype.api_version}/{rtype.kind}")
        if rtype.namespaced:
            namespace = namespace or metadata.get("namespace") or "default"
            if metadata.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
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
            key = _key(rtype, namespace, name)
            if rtype.namespaced and ("namespaces", "", namespace) not in self.objects:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{rtype.qualified_name} "{name}" already exists',
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
            obj = admit("CREATE", rtype, None, obj, None)
            self._record(rtype, "ADDED", obj, None)
            self.objects[key] = obj
            created = copy.deepcopy(obj)
            self._queue_dependent(key)
            return created

    def update(self, rtype: ResourceType, name: str, body: JSON, subresource: str | None,
               expected_version: str | None, namespace: str = "", admit: Admit = _admit_all) -> JSON:
        """Replace an object (or its status); `expected_version` is the precondition ("" / None = unconditional)."""
        with self.changed:
            key = _key(rtype, namespace, name)
            current = self.objects.get(key)
            if current is None:
                raise not_found(rtype, name)
            if expected_version and expected_version != current["metadata"]["resourceVersion"]:
                raise conflict(rtype, name, "the object has been modified; please apply your changes to the "
                                             "latest version and try again")
            if (body.get("metadata") or {}).get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            updated = self._merge_update(rtype, current, copy.deepcopy(body), subresource)
            updated = admit("UPDATE", rtype, copy.deepcopy(current), updated, subresource)
            if updated == current:
                return copy.deepcopy(current)  # a no-op write keeps the resourceVersion, as the real server does
            previous = copy.deepcopy(current)
            self._record(rtype, "MODIFIED", updated, previous)
            self.objects[key] = updated
            result = copy.deepcopy(updated)
            self._queue_dependent(key)
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
        for kept in ("uid", "creationTimestamp", "resourceVersion", "generation", "name", "namespace"):
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

    def patch(self, rtype: ResourceType, name: str, content_type: str, patch: Any, subresource: str | None,
              namespace: str = "", admit: Admit = _admit_all) -> JSON:
        with self.changed:
            current = self.get(rtype, name, namespace)
            if content_type == "application/json-patch+json":
                patched = json_patch(current, patch)
            elif content_type == "application/merge-patch+json":
                patched = json_merge_patch(current, patch)
            elif content_type == "application/strategic-merge-patch+json":
                if rtype.custom:
                    raise ApiError(415, "UnsupportedMediaType",
                                   "strategic merge patch is not supported for custom resources")
                patched = strategic_merge_patch(current, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                                            "accepted media types include: application/json-patch"
                                                            "+json, application/merge-patch+json")
            if not isinstance(patched, dict):
                raise ApiError(422, "Invalid", "the patched document is not an object")
            # A resourceVersion in the patch is a precondition; otherwise the patch applies to the latest object.
            wanted = (patched.get("metadata") or {}).get("resourceVersion")
            return self.update(rtype, name, patched, subresource, wanted, namespace, admit)

    def delete(self, rtype: ResourceType, name: str, preconditions: JSON, namespace: str = "",
               admit: Admit = _admit_all) -> JSON:
        with self.changed:
            key = _key(rtype, namespace, name)
            current = self.objects.get(key)
            if current is None:
                raise not_found(rtype, name)
            if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
                raise conflict(rtype, name, f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                                             f"UID in object meta: {current['metadata']['uid']}")
            wanted = preconditions.get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise conflict(rtype, name, f"Precondition failed: ResourceVersion in precondition: {wanted}, "
                                             f"ResourceVersion in object meta: "
                                             f"{current['metadata']['resourceVersion']}")
            admit("DELETE", rtype, copy.deepcopy(current), copy.deepcopy(current), None)
            deleted = self._delete_locked(rtype, key)
            self.gc_owners.append(deleted["metadata"]["uid"])
            self.changed.notify_all()
            return deleted

    def _delete_locked(self, rtype: ResourceType, key: Key) -> JSON:
        current = self.objects.pop(key)
        previous = copy.deepcopy(current)
        self._record(rtype, "DELETED", current, previous)
        return copy.deepcopy(current)

    def _queue_dependent(self, key: Key) -> None:
        """Must hold the lock."""
        if self.objects[key]["metadata"].get("ownerReferences"):
            self.gc_dependents.append(key)
            self.changed.notify_all()

    def garbage_pending(self) -> bool:
        """Must hold the lock."""
        return bool(self.gc_owners or self.gc_dependents)

    def collect_garbage(self) -> int:
        """One pass of the garbage collector (background propagation): every dependent of a deleted owner loses
        that owner reference and is deleted once it has none left (cascading), and an object whose owner references
        all name objects that do not exist is deleted. Returns how many objects it deleted."""
        deleted = 0
        with self.changed:
            live = {obj["metadata"]["uid"] for obj in self.objects.values()}
            for key in self.gc_dependents:
                obj = self.objects.get(key)
                references = (obj or {}).get("metadata", {}).get("ownerReferences") or []
                if obj is not None and references and not any(ref.get("uid") in live for ref in references):
                    self.gc_owners.append(self._delete_locked(self.type_of(key[0]), key)["metadata"]["uid"])
                    deleted += 1
            self.gc_dependents.clear()
            while self.gc_owners:
                uid = self.gc_owners.pop()
                for key, obj in builtins.list(self.objects.items()):
                    references = obj["metadata"].get("ownerReferences") or []
                    if not any(reference.get("uid") == uid for reference in references):
                        continue
                    remaining = [reference for reference in references if reference.get("uid") != uid]
                    rtype = self.type_of(key[0])
                    if remaining:
                        previous = copy.deepcopy(obj)
                        obj["metadata"]["ownerReferences"] = remaining
                        self._record(rtype, "MODIFIED", obj, previous)
                    else:
                        self.gc_owners.append(self._delete_locked(rtype, key)["metadata"]["uid"])
                        deleted += 1
        return deleted

    def compact(self) -> None:
        """Forget the whole history: every watch or exact list from an older resourceVersion gets 410 Gone."""
        with self.changed:
            self.history.clear()
            self.oldest_watchable = self.resource_version + 1
            self.changed.notify_all()
