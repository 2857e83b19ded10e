"""The server: the store behind one or more listeners (loopback, and other network namespaces), its lifecycle
(start, stop, restart), the record of the requests it answered and the test's fault-injection controls."""

from __future__ import annotations

import base64
import collections
import ctypes
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from wgcni_lab.apiserver.admission import Admission
from wgcni_lab.apiserver.auth import Authenticator
from wgcni_lab.apiserver.faults import Fault, Faults
from wgcni_lab.apiserver.handler import HttpServer
from wgcni_lab.apiserver.rbac import BOOTSTRAP_POLICY, Authorizer
from wgcni_lab.apiserver.resources import BUILTIN_TYPES, JSON, NODES, ResourceType
from wgcni_lab.apiserver.schema import CustomResourceSchema
from wgcni_lab.apiserver.store import CRD_QUALIFIED_NAME, Store
from wgcni_lab.apiserver.tls import ServingCertificates
from wgcni_lab.apiserver.watch import Watcher

CLONE_NEWNET = 0x40000000


@dataclass
class RequestRecord:
    """What a test can inspect about a request the server answered."""

    method: str
    path: str
    code: int
    at: float
    watch: bool = False
    user: str = ""  # the authenticated user ("" when the request failed before authentication)
    query: str = ""


@dataclass(frozen=True)
class NamespacedListener:
    """An extra address to serve on inside another network namespace (e.g. the lab's VNet, so that hooks running
    in node namespaces reach the server while the test process talks to it on loopback)."""

    netns: str  # a name under /run/netns or a path
    host: str
    port: int


def bind_in_namespace(listener: NamespacedListener, api: ApiServer) -> HttpServer:
    """Create the listening socket inside `listener.netns`: setns() applies to the calling thread only, so the
    bind happens on a short-lived thread; the socket stays in that namespace whoever serves it."""
    result: list[HttpServer | BaseException] = []

    def bind() -> None:
        try:
            path = listener.netns if "/" in listener.netns else f"/run/netns/{listener.netns}"
            with open(path) as namespace:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {path} failed")
            http = HttpServer((listener.host, listener.port), api)
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
    # Objects created at start, as `kubectl apply` of them would (conf/rbac.yaml's RBAC and admission policy).
    manifests: list[JSON] = field(default_factory=list)
    # RBAC (the real default) or AlwaysAllow (kube-apiserver --authorization-mode=AlwaysAllow: every authenticated
    # or anonymous request is allowed; admission still applies).
    authorization_mode: str = "RBAC"
    tls_hosts: list[str] = field(default_factory=list)  # more names the serving certificate covers
    tls_dir: Path | None = None  # where the CA certificate goes (made here; the caller removes it); None: a tempdir
    # Seconds the garbage collector lags behind a deletion (the real one: milliseconds to seconds, more under
    # load); dependents are always deleted asynchronously, after the owner's DELETE has been answered.
    gc_delay: float = 0.0

    def __post_init__(self) -> None:
        if any(listener.port == 0 for listener in self.also_listen):
            raise ValueError("a namespaced listener needs a fixed port (it must stay the same across restarts)")
        self.tls = ServingCertificates([self.host, "127.0.0.1", "::1", "localhost", *self.tls_hosts,
                                        *(listener.host for listener in self.also_listen)],
                                       self.tls_dir)
        self.store = Store(list(BUILTIN_TYPES), self.history_window)
        if self.authorization_mode not in ("RBAC", "AlwaysAllow"):
            raise ValueError(f"authorization mode {self.authorization_mode!r}: RBAC or AlwaysAllow")
        self.authenticator = Authenticator(self._node_uid)
        self.authorizer = Authorizer(self.store)
        self.admission = Admission(self.store)
        for crd in self.crds:  # as `kubectl apply` of the manifest would: the object, and the types it serves
            self.store.create(self.store.type_of(CRD_QUALIFIED_NAME), crd)
        self.create_objects(BOOTSTRAP_POLICY + self.manifests)
        self.requests: collections.deque[RequestRecord] = collections.deque(maxlen=100_000)
        self.faults = Faults()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._watchers: set[Watcher] = set()
        self._servers: list[tuple[HttpServer, threading.Thread]] = []
        self._schemas: dict[int, tuple[JSON, CustomResourceSchema]] = {}  # by the schema's identity
        self._gc_stop = threading.Event()
        self._gc_thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> ApiServer:
        self._gc_stop.clear()
        self._gc_thread = threading.Thread(target=self._garbage_collector, name="apiserver-gc", daemon=True)
        self._gc_thread.start()
        try:
            primary = HttpServer((self.host, self.port), self)
            self.port = primary.server_address[1]
            self._serve(primary)
            for listener in self.also_listen:
                self._serve(bind_in_namespace(listener, self))
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self, http: HttpServer) -> None:
        thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"apiserver:{http.server_address[1]}", daemon=True)
        thread.start()
        self._servers.append((http, thread))

    def add_listener(self, listener: NamespacedListener) -> None:
        """Serve in one more network namespace from now on (a node that joins, or comes back after a reboot)."""
        if listener.port == 0:
            raise ValueError("a namespaced listener needs a fixed port (it must stay the same across restarts)")
        self._serve(bind_in_namespace(listener, self))
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

    def _garbage_collector(self) -> None:
        store = self.store
        while not self._gc_stop.is_set():
            with store.changed:
                while not store.garbage_pending() and not self._gc_stop.is_set():
                    store.changed.wait(0.5)
            if self._gc_stop.wait(self.gc_delay) if self.gc_delay else self._gc_stop.is_set():
                return
            store.collect_garbage()

    def stop(self) -> None:
        self._gc_stop.set()
        with self.store.changed:
            self.store.changed.notify_all()
        if self._gc_thread is not None:
            self._gc_thread.join()
            self._gc_thread = None
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
        return f"https://{self.host}:{self.port}"

    @property
    def ca_file(self) -> str:
        """The cluster CA's certificate (PEM), what a client verifies the server with."""
        return str(self.tls.ca_file)

    # --- objects and credentials --------------------------------------------------------------------------------
    def create_objects(self, objects: list[JSON]) -> None:
        """Create manifests' objects (any served kind; namespaced ones in their metadata.namespace)."""
        for obj in objects:
            group, _, version = obj["apiVersion"].rpartition("/")
            rtype = next((rtype for rtype in self.store.types.values()
                          if (rtype.group, rtype.version, rtype.kind) == (group, version, obj["kind"])), None)
            if rtype is None:
                raise ValueError(f"{obj['apiVersion']}/{obj['kind']} is not served here")
            self.store.create(rtype, obj, (obj.get("metadata") or {}).get("namespace", ""))

    def schema_of(self, rtype: ResourceType) -> CustomResourceSchema:
        """The compiled structural schema of a custom resource version (compiled once per schema)."""
        assert rtype.schema is not None
        with self._lock:
            entry = self._schemas.get(id(rtype.schema))
            if entry is None or entry[0] is not rtype.schema:
                entry = self._schemas[id(rtype.schema)] = (rtype.schema, CustomResourceSchema(rtype.schema))
            return entry[1]

    def _node_uid(self, name: str) -> str | None:
        with self.store.changed:
            node = self.store.find(NODES, name)
            return node["metadata"]["uid"] if node else None

    @property
    def admin_token(self) -> str:
        """A bearer token of the cluster's administrator (group system:masters)."""
        return self.authenticator.admin_token

    def node_token(self, node_name: str, ttl: float = 3600.0, namespace: str = "kube-system",
                   service_account: str = "wgcni-node") -> str:
        """What the kubelet gets from TokenRequest for wgcni's DaemonSet pod on `node_name`: a token of the
        service account bound to that Node (its name and uid), expiring after `ttl` seconds."""
        uid = self._node_uid(node_name)
        if uid is None:
            raise ValueError(f"no Node {node_name!r} to bind a token to")
        return self.authenticator.service_account_token(namespace, service_account, (node_name, uid), ttl)

    def kubeconfig(self, server: str = "", token: str = "") -> JSON:
        """A kubeconfig for kubectl (or any client) against this server, as the cluster's administrator unless
        another `token` is given."""
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "wgcni-lab", "preferences": {},
            "clusters": [{"name": "wgcni-lab", "cluster": {
                "server": server or self.url,
                "certificate-authority-data": base64.b64encode(self.tls.ca_pem).decode()}}],
            "users": [{"name": "admin", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "wgcni-lab", "context": {"cluster": "wgcni-lab", "user": "admin"}}],
        }

    # --- fault injection ---------------------------------------------------------------------------------------
    def fail_next(self, count: int = 1, code: int = 500, methods: set[str] | None = None,
                  path_contains: str | None = None, user_agent_prefix: str | None = None,
                  user_agent: str | None = None, retry_after: int | None = None) -> None:
        """The next `count` requests with one of `methods` whose path contains `path_contains` and whose
        User-Agent starts with `user_agent_prefix` (e.g. only the hooks', not the test's own client) or is exactly
        `user_agent` (one hook's) get `code` (429s with `Retry-After: retry_after`, 1 s by default)."""
        self.faults.add(Fault(count, code, frozenset(methods) if methods else None, path_contains,
                              user_agent_prefix, user_agent, retry_after))

    def pending_faults(self) -> int:
        """Injected failures not served yet."""
        return self.faults.pending()

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_delay(self, seconds: float) -> None:
        """Every request waits this long before it is handled."""
        self.faults.delay = seconds

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

    def track_watcher(self, watcher: Watcher, add: bool) -> None:
        with self._lock:
            if add:
                self._watchers.add(watcher)
            else:
                self._watchers.discard(watcher)

    def record(self, method: str, path: str, code: int, is_watch: bool, user: str = "", query: str = "") -> None:
        with self._lock:
            self.requests.append(RequestRecord(method, path, code, time.monotonic(), is_watch, user, query))
