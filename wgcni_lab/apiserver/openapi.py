"""/openapi/v3 as far as kubectl reads it: the root lists one document per group/version, and each document has, for
every resource, its paths with the PATCH operation tagged with its group/version/kind and the `fieldValidation` query
parameter. That is what `kubectl apply` checks to leave field validation to the server (`fieldValidation=Strict`)
instead of validating against schemas itself; no component schemas are served, so kubectl computes strategic merge
patches from its compiled-in types, as it does against a server whose OpenAPI lacks them."""

from __future__ import annotations

import hashlib

from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import JSON, ResourceType


def _prefix(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def _group_versions(types: list[ResourceType]) -> dict[str, list[ResourceType]]:
    served: dict[str, list[ResourceType]] = {}
    for rtype in types:
        served.setdefault(_prefix(rtype.group, rtype.version), []).append(rtype)
    return served


def root(types: list[ResourceType]) -> JSON:
    """GET /openapi/v3."""
    paths = {}
    for prefix, served in sorted(_group_versions(types).items()):
        digest = hashlib.sha256(repr(document_for(served)).encode()).hexdigest()[:32].upper()
        paths[prefix] = {"serverRelativeURL": f"/openapi/v3/{prefix}?hash={digest}"}
    return {"paths": paths}


def document(types: list[ResourceType], prefix: str) -> JSON:
    """GET /openapi/v3/api/v1 or /openapi/v3/apis/<group>/<version>."""
    served = _group_versions(types).get(prefix)
    if served is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return document_for(served)


def document_for(served: list[ResourceType]) -> JSON:
    paths: JSON = {}
    parameters = [{"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                  for name in ("dryRun", "fieldManager", "fieldValidation", "force")]
    for rtype in sorted(served, key=lambda rtype: rtype.plural):
        gvk = {"group": rtype.group, "version": rtype.version, "kind": rtype.kind}
        base = f"/{_prefix(rtype.group, rtype.version)}"
        if rtype.namespaced:
            base += "/namespaces/{namespace}"
        suffixes = ["/{name}"] + (["/{name}/status"] if rtype.has_status else [])
        for suffix in suffixes:
            paths[f"{base}/{rtype.plural}{suffix}"] = {"patch": {
                "operationId": f"patch{rtype.kind}", "parameters": parameters,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
            }}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.31.0"}, "paths": paths,
            "components": {"schemas": {}}}
