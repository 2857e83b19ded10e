"""The resource types the server serves: the built-in ones an operator's `kubectl apply -k conf/` and `kubectl
describe` touch, and the custom resources of CRD manifests (created at start or through the API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    """One resource the server serves (cluster-scoped unless `namespaced`)."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = False
    has_status: bool = True
    reset_status_on_create: bool = True  # custom resources with a status subresource drop status on create
    tracks_generation: bool = True
    return_deleted_object: bool = True  # custom resources answer DELETE with the object, nodes with a Status
    short_names: tuple[str, ...] = ()
    singular: str = ""
    categories: tuple[str, ...] = ()
    # A CRD's additionalPrinterColumns and its structural schema (openAPIV3Schema); None for built-in types.
    printer_columns: tuple[JSON, ...] = field(default=(), compare=False, hash=False)
    schema: JSON | None = field(default=None, compare=False, hash=False)
    custom: bool = False  # served from a CustomResourceDefinition

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_name(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_version(self) -> str:
        return self.api_version


NODES = ResourceType(
    group="", version="v1", plural="nodes", kind="Node", short_names=("no",), singular="node",
    reset_status_on_create=False, tracks_generation=False, return_deleted_object=False,
)


def _builtin(group: str, version: str, plural: str, kind: str, namespaced: bool, has_status: bool = False,
             short_names: tuple[str, ...] = ()) -> ResourceType:
    return ResourceType(group=group, version=version, plural=plural, kind=kind, namespaced=namespaced,
                        has_status=has_status, reset_status_on_create=False, tracks_generation=group != "",
                        return_deleted_object=False, short_names=short_names, singular=kind.lower())


# What `kubectl apply -k conf/` creates and what `kubectl describe` reads, beside nodes.
NAMESPACES = _builtin("", "v1", "namespaces", "Namespace", False, has_status=True, short_names=("ns",))
BUILTIN_TYPES: tuple[ResourceType, ...] = (
    NODES,
    NAMESPACES,
    _builtin("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
    _builtin("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=("sa",)),
    _builtin("", "v1", "events", "Event", True, short_names=("ev",)),
    _builtin("", "v1", "pods", "Pod", True, has_status=True, short_names=("po",)),
    _builtin("apps", "v1", "daemonsets", "DaemonSet", True, has_status=True, short_names=("ds",)),
    _builtin("coordination.k8s.io", "v1", "leases", "Lease", True),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _builtin("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", "ValidatingAdmissionPolicy",
             False, has_status=True),
    _builtin("admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings",
             "ValidatingAdmissionPolicyBinding", False),
    _builtin("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
             has_status=True, short_names=("crd", "crds")),
)
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def resource_types_from_crd(crd: JSON) -> list[ResourceType]:
    """Every served version of a CustomResourceDefinition manifest (apiextensions.k8s.io/v1) as a ResourceType."""
    spec = crd["spec"]
    names = spec["names"]
    types = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        types.append(ResourceType(
            group=spec["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope") == "Namespaced",
            has_status="status" in (version.get("subresources") or {}),
            short_names=tuple(names.get("shortNames") or ()), singular=names.get("singular", names["kind"].lower()),
            categories=tuple(names.get("categories") or ()),
            printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"), custom=True,
        ))
    return types
