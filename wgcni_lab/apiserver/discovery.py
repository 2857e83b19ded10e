"""Discovery as kubectl reads it (the legacy, unaggregated form): /api, /apis, /api/v1, /apis/<group>[/<version>]
resource lists built from the types the store serves, and /version."""

from __future__ import annotations

from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import ALL_VERBS, JSON, ResourceType

VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-wgcni-test", "gitCommit": "", "gitTreeState": "",
           "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"}


def api_versions() -> JSON:
    """GET /api."""
    return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}


def _groups(types: list[ResourceType]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for rtype in types:
        if rtype.group and rtype.version not in groups.setdefault(rtype.group, []):
            groups[rtype.group].append(rtype.version)
    return groups


def _group(name: str, versions: list[str]) -> JSON:
    listed = [{"groupVersion": f"{name}/{version}", "version": version} for version in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": listed, "preferredVersion": listed[0]}


def api_group_list(types: list[ResourceType]) -> JSON:
    """GET /apis."""
    groups = _groups(types)
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [_group(name, versions) for name, versions in sorted(groups.items())]}


def api_group(types: list[ResourceType], name: str) -> JSON:
    """GET /apis/<group>."""
    versions = _groups(types).get(name)
    if versions is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _group(name, versions)


def resource_list(types: list[ResourceType], group: str, version: str) -> JSON:
    """GET /api/v1 or /apis/<group>/<version>: each resource with its verbs, short names and subresources."""
    served = [rtype for rtype in types if (rtype.group, rtype.version) == (group, version)]
    if not served:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    resources: list[JSON] = []
    for rtype in sorted(served, key=lambda rtype: rtype.plural):
        entry: JSON = {"name": rtype.plural, "singularName": rtype.singular, "namespaced": rtype.namespaced,
                       "kind": rtype.kind, "verbs": list(ALL_VERBS)}
        if rtype.short_names:
            entry["shortNames"] = list(rtype.short_names)
        if rtype.categories:
            entry["categories"] = list(rtype.categories)
        resources.append(entry)
        if rtype.has_status:
            resources.append({"name": f"{rtype.plural}/status", "singularName": "", "namespaced": rtype.namespaced,
                              "kind": rtype.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": served[0].api_version,
            "resources": resources}
