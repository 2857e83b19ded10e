"""The resource types the server serves: core nodes and the cluster-scoped custom resources of CRD manifests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


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
