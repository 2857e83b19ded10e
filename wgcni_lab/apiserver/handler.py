"""The HTTP side: one handler per connection that routes each request to the store, answers Status objects for
errors and streams watches as chunked JSON lines; the threaded server a listener runs."""

from __future__ import annotations

import base64
import errno
import json
import logging
import socket
import ssl
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from wgcni_lab.apiserver import discovery, openapi
from wgcni_lab.apiserver.auth import UserInfo
from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.requests import RequestInfo, request_info
from wgcni_lab.apiserver.resources import JSON, ResourceType
from wgcni_lab.apiserver.selectors import Selection
from wgcni_lab.apiserver.store import Admit
from wgcni_lab.apiserver.tables import table, wants_table
from wgcni_lab.apiserver.watch import Watcher

if TYPE_CHECKING:
    from wgcni_lab.apiserver.server import ApiServer, NamespacedListener

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to finish the TLS handshake


def fault_error(code: int, retry_after: int | None) -> ApiError:
    """An injected failure as the real server answers it; 429 (API priority and fairness, max-in-flight) with
    `Retry-After` and details.retryAfterSeconds."""
    if code == 429:
        seconds = 1 if retry_after is None else retry_after
        return ApiError(429, "TooManyRequests", "Too many requests, please try again later.",
                        {"retryAfterSeconds": seconds}, {"Retry-After": str(seconds)})
    return ApiError(code, HTTPStatus(code).phrase.replace(" ", ""), f"injected fault: {code} {HTTPStatus(code).phrase}")


class Handler(BaseHTTPRequestHandler):
    """One client connection: reads requests, routes them to the store, answers JSON or a chunked watch."""

    protocol_version = "HTTP/1.1"
    server: HttpServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle plus the client's delayed ACK adds
        # ~40 ms to every answer (measured: 45 ms per PATCH before, 0.65 ms after).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.api.track_connection(self.connection, add=True)
        if isinstance(self.connection, ssl.SSLSocket):  # the handshake on this connection's thread, not accept()'s
            self.connection.settimeout(HANDSHAKE_TIMEOUT)
            self.connection.do_handshake()
            self.connection.settimeout(None)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api.track_connection(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Requests are recorded in ApiServer.requests instead of printed."""

    def do_GET(self) -> None:
        self.answer("GET")

    def do_POST(self) -> None:
        self.answer("POST")

    def do_PUT(self) -> None:
        self.answer("PUT")

    def do_PATCH(self) -> None:
        self.answer("PATCH")

    def do_DELETE(self) -> None:
        self.answer("DELETE")

    def send_json(self, code: int, body: JSON, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
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

    def answer(self, method: str) -> None:
        """Serve one request; every answer is recorded in ApiServer.requests."""
        api = self.server.api
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        is_watch = method == "GET" and query.get("watch") in ("true", "1")
        code = 500
        username = ""
        self.consume_body()
        try:
            if api.faults.delay:
                time.sleep(api.faults.delay)
            fault = api.faults.take(method, self.path, self.headers.get("User-Agent") or "")  # path and query
            if fault is not None:
                raise fault_error(*fault)
            info = request_info(api.store.types, method, url.path, query)
            user = api.authenticator.authenticate(self.headers.get("Authorization"))
            username = user.username
            if api.authorization_mode == "RBAC":
                api.authorizer.authorize(user, info)
            if info.rtype is None:
                code, body = 200, self._non_resource(method, url.path)
                self.send_json(code, body)
                return
            if is_watch:
                code = 200
                api.record(method, url.path, code, is_watch, username, url.query)  # now: a watch may stay open
                self._serve_watch(info, query)
                return
            code, body = self._dispatch(method, info, query, self._admitter(user, query))
            self.send_json(code, body)
        except ApiError as error:
            code = error.code
            self.send_json(error.code, error.status(), error.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if not (is_watch and code == 200):
                api.record(method, url.path, code, is_watch, username, url.query)

    def _non_resource(self, method: str, path: str) -> JSON:
        """Discovery, /version and the health endpoints."""
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        types = list(self.server.api.store.types.values())
        parts = [part for part in path.split("/") if part]
        if parts == ["version"]:
            return discovery.VERSION
        if parts[:2] == ["openapi", "v3"]:
            return openapi.root(types) if len(parts) == 2 else openapi.document(types, "/".join(parts[2:]))
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return {"status": "ok"}
        if parts == ["api"]:
            return discovery.api_versions()
        if parts == ["apis"]:
            return discovery.api_group_list(types)
        if len(parts) == 2 and parts[0] == "api":
            return discovery.resource_list(types, "", parts[1])
        if len(parts) == 2 and parts[0] == "apis":
            return discovery.api_group(types, parts[1])
        if len(parts) == 3 and parts[0] == "apis":
            return discovery.resource_list(types, parts[1], parts[2])
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _admitter(self, user: UserInfo, query: dict[str, str]) -> Admit:
        """The store's admission step for this request: a custom resource pruned and validated against its schema,
        then the ValidatingAdmissionPolicies, as `user`."""
        api = self.server.api
        dry_run = bool(query.get("dryRun"))
        field_validation = query.get("fieldValidation", "")

        def admit(operation: str, rtype: ResourceType, old: JSON | None, new: JSON, subresource: str | None) -> JSON:
            if operation != "DELETE":
                new = api.schema_of(rtype).admit(rtype, new, field_validation) if rtype.schema else new
            api.admission.admit(user, operation, rtype, old, new, subresource, dry_run)
            return new

        return admit

    def _dispatch(self, method: str, info: RequestInfo, query: dict[str, str], admit: Admit) -> tuple[int, JSON]:
        store = self.server.api.store
        rtype, name, namespace, subresource = info.rtype, info.name, info.namespace, info.subresource
        assert rtype is not None
        if info.collection:
            if method == "GET":
                return 200, self._list(info, query)
            if method == "POST":
                created = store.create(rtype, self.read_object(), namespace, admit)
                return 201, created
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection here")
        assert name is not None
        if method == "GET":
            obj = store.get(rtype, name, namespace)
            if wants_table(self.headers.get("Accept") or ""):
                return 200, table(rtype, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]},
                                  query.get("includeObject", ""))
            return 200, obj
        if method == "PUT":
            body = self.read_object()
            expected = (body.get("metadata") or {}).get("resourceVersion")
            return 200, store.update(rtype, name, body, subresource, expected, namespace, admit)
        if method == "PATCH":
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            return 200, store.patch(rtype, name, content_type, self.read_body(), subresource, namespace, admit)
        if method == "DELETE" and subresource is None:
            options = self.read_body() or {}
            deleted = store.delete(rtype, name, options.get("preconditions") or {}, namespace, admit)
            if rtype.return_deleted_object:
                return 200, deleted
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": rtype.group, "kind": rtype.plural,
                                     "uid": deleted["metadata"]["uid"]}}
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _list(self, info: RequestInfo, query: dict[str, str]) -> JSON:
        """A list, paginated as the real server does: `limit` answers that many items and a `continue` token for
        the rest, read at the first page's resourceVersion (410 Expired once the history no longer reaches it);
        `resourceVersion=0` is served whole from the "watch cache", ignoring `limit`."""
        assert info.rtype is not None
        rtype, store = info.rtype, self.server.api.store
        selection = Selection.from_query(query, info.namespace if rtype.namespaced and info.namespace else None)
        limit = self._parse_limit(query.get("limit", ""))
        after: tuple[str, str] | None = None
        exact = None
        if query.get("continue"):
            exact, after = decode_continue(query["continue"])
            if exact < store.oldest_watchable - 1:
                raise ApiError(410, "Expired", CONTINUE_EXPIRED)
        elif query.get("resourceVersionMatch") == "Exact":
            exact = self._parse_version(query.get("resourceVersion", ""))
            if exact is None:
                raise ApiError(400, "BadRequest", "resourceVersionMatch=Exact needs a resourceVersion")
        elif query.get("resourceVersion") == "0":
            limit = 0
        items, version, remaining = store.list(rtype, selection, exact, after, limit)
        metadata: JSON = {"resourceVersion": str(version)}
        if remaining:
            metadata["continue"] = encode_continue(version, _list_key(items[-1]))
            metadata["remainingItemCount"] = remaining
        if wants_table(self.headers.get("Accept") or ""):
            return table(rtype, items, metadata, query.get("includeObject", ""))
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": metadata, "items": items}

    @staticmethod
    def _parse_limit(text: str) -> int:
        if not text:
            return 0
        if not text.isdigit():
            raise ApiError(400, "BadRequest", f"invalid limit: {text!r}")
        return int(text)

    @staticmethod
    def _parse_version(text: str) -> int | None:
        if text in ("", "0"):
            return None
        if not text.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}")
        return int(text)

    def _serve_watch(self, info: RequestInfo, query: dict[str, str]) -> None:
        api = self.server.api
        rtype = info.rtype
        assert rtype is not None
        selection = Selection.from_query(query, info.namespace if rtype.namespaced and info.namespace else None)
        since = self._parse_version(query.get("resourceVersion", ""))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else api.default_watch_timeout
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event: JSON) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        watcher = None
        try:
            watcher = Watcher(api.store, rtype, selection, since, bookmarks, api.bookmark_interval)
            api.track_watcher(watcher, add=True)
            while True:
                event = watcher.next(deadline)
                if event is None:
                    break
                send(event)
        except ApiError as error:  # 410 inside the stream, as the real server sends it
            send({"type": "ERROR", "object": error.status()})
        finally:
            if watcher is not None:
                api.track_watcher(watcher, add=False)
        if watcher is not None and watcher.cancelled:
            # A cut stream: no terminating chunk, and the connection goes away under the client.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


CONTINUE_EXPIRED = ("The provided continue parameter is too old to display a consistent list result. You can start a "
                    "new list without the continue parameter.")


def _list_key(obj: JSON) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def encode_continue(version: int, after: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps({"rv": version, "start": list(after)}).encode()).decode()


def decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        version, (namespace, name) = int(decoded["rv"]), decoded["start"]
        return version, (str(namespace), str(name))
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "BadRequest", "continue key is not valid") from None


class HttpServer(ThreadingHTTPServer):
    """One listening socket of the API server; its connections are served by Handler on their own threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], api: ApiServer):
        self.api = api
        self.listener: NamespacedListener | None = None  # set when it serves inside another network namespace
        super().__init__(address, Handler)
        self.socket = api.tls.context().wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connections cut by fault injection, restarts or clients going away are normal here; anything else is
        logged (the base class would print a traceback to stderr)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, ssl.SSLError)) or (
                isinstance(error, OSError) and error.errno in (errno.EBADF, errno.ENOTCONN)):
            return
        log.exception("test API server: error while serving %s", client_address)
