"""What a request asks for, as the real server's RequestInfoFactory reads it from the URL: resource or non-resource
path, the verb RBAC checks (get/list/watch/create/update/patch/delete), group, namespace, resource, subresource and
name (for a list or watch narrowed to one name by `fieldSelector=metadata.name=`, that name, as the real server)."""

from __future__ import annotations

from dataclasses import dataclass

from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import ResourceType

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class RequestInfo:
    """One request's attributes; `rtype` is None for a non-resource request (discovery, /version, /healthz)."""

    verb: str
    path: str
    rtype: ResourceType | None = None
    namespace: str = ""
    name: str | None = None
    subresource: str | None = None
    collection: bool = False  # the URL names no object (a list, watch, create or deletecollection)

    @property
    def resource(self) -> str:
        return self.rtype.plural if self.rtype else ""

    @property
    def group(self) -> str:
        return self.rtype.group if self.rtype else ""


def _field_selector_name(query: dict[str, str]) -> str | None:
    for term in query.get("fieldSelector", "").split(","):
        key, _, value = term.partition("=")
        if key.strip() == "metadata.name" and not key.endswith("!"):
            return value.lstrip("=") or None
    return None


def request_info(types: dict[tuple[str, str, str], ResourceType], method: str, path: str,
                 query: dict[str, str]) -> RequestInfo:
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return RequestInfo(verb=method.lower(), path=path)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        nested = types.get((group, version, rest[2]))
        if nested is not None and nested.namespaced:
            namespace, rest = rest[1], rest[2:]
    rtype = types.get((group, version, rest[0]))
    if rtype is None or len(rest) > 3 or (rtype.namespaced and len(rest) > 1 and not namespace):
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) == 3 else None
    if subresource is not None and (subresource != "status" or not rtype.has_status):
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    if name is None:
        if method == "GET":
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
        else:
            verb = {"POST": "create", "DELETE": "deletecollection"}.get(method, method.lower())
        return RequestInfo(verb=verb, path=path, rtype=rtype, namespace=namespace,
                           name=_field_selector_name(query) if method == "GET" else None, collection=True)
    verb = ("watch" if query.get("watch") in ("true", "1") else "get") if method == "GET" else \
        _VERBS.get(method, method.lower())
    return RequestInfo(verb=verb, path=path, rtype=rtype, namespace=namespace, name=name, subresource=subresource)
