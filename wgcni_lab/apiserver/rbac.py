"""Authorization: RBAC as the real authorizer evaluates it, over the Roles, ClusterRoles and their bindings the store
holds (conf/rbac.yaml applied, plus the bootstrap policy below): subjects (User, Group, ServiceAccount), apiGroups,
resources and subresources (`wireguardnodes/status`), verbs, resourceNames, nonResourceURLs. Denials are 403s
worded as the real server words them."""

from __future__ import annotations

from wgcni_lab.apiserver.auth import MASTERS, UserInfo
from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.requests import RequestInfo
from wgcni_lab.apiserver.resources import JSON
from wgcni_lab.apiserver.store import Store

RBAC_GROUP = "rbac.authorization.k8s.io"
DISCOVERY_URLS = ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/",
                  "/healthz", "/livez", "/readyz"]
PUBLIC_URLS = ["/healthz", "/livez", "/readyz", "/version", "/version/"]


def _cluster_role(name: str, rules: list[JSON]) -> JSON:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRole", "rules": rules,
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}}}


def _binding(name: str, role: str, groups: list[str]) -> JSON:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": group} for group in groups]}


# The part of the real server's bootstrap policy a cluster without it would miss: the administrators' group, and
# discovery for every authenticated user (kubectl needs it before anything else).
BOOTSTRAP_POLICY: list[JSON] = [
    _cluster_role("cluster-admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                                    {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
    _binding("cluster-admin", "cluster-admin", [MASTERS]),
    _cluster_role("system:discovery", [{"nonResourceURLs": DISCOVERY_URLS, "verbs": ["get"]}]),
    _binding("system:discovery", "system:discovery", ["system:authenticated"]),
    _cluster_role("system:public-info-viewer", [{"nonResourceURLs": PUBLIC_URLS, "verbs": ["get"]}]),
    _binding("system:public-info-viewer", "system:public-info-viewer",
             ["system:authenticated", "system:unauthenticated"]),
]


def _subject_matches(subject: JSON, user: UserInfo, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == user.username
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return user.username == f"system:serviceaccount:{namespace}:{name}"
    return False


def _url_matches(patterns: list[str], path: str) -> bool:
    return any(pattern == "*" or pattern == path or (pattern.endswith("*") and path.startswith(pattern[:-1]))
               for pattern in patterns)


def rule_allows(rule: JSON, info: RequestInfo) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and info.verb not in verbs:
        return False
    if info.rtype is None:
        return _url_matches(rule.get("nonResourceURLs") or [], info.path)
    groups = rule.get("apiGroups")
    if groups is None or ("*" not in groups and info.group not in groups):
        return False
    resources = rule.get("resources") or []
    combined = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    if not ("*" in resources or combined in resources
            or (info.subresource and f"*/{info.subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (info.name is not None and info.name in names)


class Authorizer:
    """RBAC over the store's current Roles and bindings (read at each request, as the real informers feed it)."""

    def __init__(self, store: Store):
        self.store = store

    def _rules(self, user: UserInfo, namespace: str) -> list[JSON]:
        """Must hold the store lock: every rule granted to `user` cluster-wide and in `namespace`."""
        rules: list[JSON] = []
        cluster_roles = {obj["metadata"]["name"]: obj for obj in self.store.items_of(f"clusterroles.{RBAC_GROUP}")}
        for binding in self.store.items_of(f"clusterrolebindings.{RBAC_GROUP}"):
            if any(_subject_matches(subject, user, "") for subject in binding.get("subjects") or []):
                role = cluster_roles.get((binding.get("roleRef") or {}).get("name", ""))
                rules.extend((role or {}).get("rules") or [])
        if not namespace:
            return rules
        roles = {obj["metadata"]["name"]: obj for obj in self.store.items_of(f"roles.{RBAC_GROUP}")
                 if obj["metadata"].get("namespace") == namespace}
        for binding in self.store.items_of(f"rolebindings.{RBAC_GROUP}"):
            if binding["metadata"].get("namespace") != namespace:
                continue
            if any(_subject_matches(subject, user, namespace) for subject in binding.get("subjects") or []):
                reference = binding.get("roleRef") or {}
                source = cluster_roles if reference.get("kind") == "ClusterRole" else roles
                rules.extend((source.get(reference.get("name", "")) or {}).get("rules") or [])
        return rules

    def authorize(self, user: UserInfo, info: RequestInfo) -> None:
        """Raise the real server's 403 unless a rule allows the request."""
        with self.store.changed:
            rules = self._rules(user, info.namespace)
        if any(rule_allows(rule, info) for rule in rules):
            return
        raise forbidden(user, info)


def forbidden(user: UserInfo, info: RequestInfo) -> ApiError:
    if info.rtype is None:
        return ApiError(403, "Forbidden", f'forbidden: User "{user.username}" cannot {info.verb} path '
                                          f'"{info.path}"')
    resource = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    what = f'{info.rtype.qualified_name} "{info.name}"' if info.name else info.rtype.qualified_name
    scope = f'in the namespace "{info.namespace}"' if info.namespace else "at the cluster scope"
    return ApiError(403, "Forbidden",
                    f'{what} is forbidden: User "{user.username}" cannot {info.verb} resource "{resource}" in API '
                    f'group "{info.group}" {scope}',
                    {"name": info.name or "", "group": info.group, "kind": info.resource})
