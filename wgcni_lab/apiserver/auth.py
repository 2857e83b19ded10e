"""Authentication: bearer tokens the server issued, as the real server's service-account token authenticator and a
static administrator token answer them.

A service-account token is what the TokenRequest API hands the kubelet for a pod; one bound to a node carries the
node's name and uid, and the authenticated user then has the `authentication.kubernetes.io/node-name` and
`.../node-uid` extras (Kubernetes >= 1.30, ServiceAccountTokenPodNodeInfo) that conf/rbac.yaml's admission policy
reads. Tokens expire (the kubelet refreshes the file before that; the client re-reads it), and a node-bound token
stops authenticating once its Node is gone or was recreated with another uid, as the real validator checks. Tokens
are opaque random strings held in a table here, not signed JWTs: nothing in the lab or the hook reads inside them.
No token: the anonymous user (`system:anonymous`, group `system:unauthenticated`), which RBAC then judges.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wgcni_lab.apiserver.errors import ApiError

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NODE_UID_EXTRA = "authentication.kubernetes.io/node-uid"
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"
ANONYMOUS = "system:anonymous"
MASTERS = "system:masters"


@dataclass(frozen=True)
class UserInfo:
    """Who made a request, as admission's `request.userInfo` shows it."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict, hash=False, compare=False)

    def as_cel(self) -> dict[str, object]:
        return {"username": self.username, "uid": self.uid, "groups": list(self.groups),
                "extra": {key: list(values) for key, values in self.extra.items()}}


ANONYMOUS_USER = UserInfo(ANONYMOUS, groups=("system:unauthenticated",))


@dataclass
class _Token:
    user: UserInfo
    expires_at: float  # time.time(); inf = never
    bound_node: tuple[str, str] | None  # (name, uid) the token is bound to


class Authenticator:
    """The tokens this server accepts. `node_uid(name)` answers the current uid of a Node (None when absent)."""

    def __init__(self, node_uid: Callable[[str], str | None], clock: Callable[[], float] = time.time):
        self._node_uid, self._clock = node_uid, clock
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self.admin_token = self.issue(UserInfo("kubernetes-admin", groups=(MASTERS, "system:authenticated")))

    def issue(self, user: UserInfo, ttl: float = float("inf"), bound_node: tuple[str, str] | None = None) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _Token(user, self._clock() + ttl, bound_node)
        return token

    def service_account_token(self, namespace: str, name: str, node: tuple[str, str] | None = None,
                              ttl: float = 3600.0) -> str:
        """A token for service account `namespace/name` (TokenRequest), bound to `node` = (name, uid) if given."""
        extra: dict[str, list[str]] = {CREDENTIAL_ID_EXTRA: [f"JTI={secrets.token_hex(16)}"]}
        if node is not None:
            extra[NODE_NAME_EXTRA], extra[NODE_UID_EXTRA] = [node[0]], [node[1]]
        user = UserInfo(f"system:serviceaccount:{namespace}:{name}", uid=f"sa-{namespace}-{name}",
                        groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                "system:authenticated"), extra=extra)
        return self.issue(user, ttl, node)

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def authenticate(self, authorization: str | None) -> UserInfo:
        """The user of a request's Authorization header; 401 for a token that is unknown, expired or bound to a
        Node that no longer exists."""
        if not authorization:
            return ANONYMOUS_USER
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Unauthorized", "Unauthorized")
        with self._lock:
            entry = self._tokens.get(token.strip())
        if entry is None or self._clock() >= entry.expires_at:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if entry.bound_node is not None and self._node_uid(entry.bound_node[0]) != entry.bound_node[1]:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return entry.user
