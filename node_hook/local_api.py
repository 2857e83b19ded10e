"""The hook's local API: a Unix stream socket (mode 0600), one JSON request line -> one JSON answer line.

Ops (docs/design.md): pod-added, pod-deleted, check, status, peers, routes, pods, diagnose, resync, rotate-key.
`peers` takes optional `offset`, `limit` and `node`; `routes` optional `limit`, `owner` and the keyset cursor
`after` (a `limit` is at least 1, as the CLI's `--limit`); so answers stay small at 5 000 peers.
Every answer has `ok`; on `ok: false` an `error` a person can act on. A malformed request never reaches the
engine and never kills the server.
`request()` is the client used by the CLI (the plugin has its own stdlib client).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cni_plugin.strict import ADD_HOLD_MAX
from node_hook.engine import KeyRotationError
from node_hook.keys import KeyFileError

if TYPE_CHECKING:
    from node_hook.node import Node

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
_RECORD_FIELDS = ("network", "containerID", "ifname")


class ApiError(ValueError):
    pass


def _require_record_key(request: dict[str, Any]) -> tuple[str, str, str]:
    values = []
    for field in _RECORD_FIELDS:
        value = request.get(field)
        if not isinstance(value, str) or not value:
            raise ApiError(f"{request.get('op')}: '{field}' must be a non-empty string")
        values.append(value)
    return values[0], values[1], values[2]


def _integer(request: dict[str, Any], field: str, default: int | None, minimum: int) -> int | None:
    value = request.get(field, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ApiError(f"{request['op']}: '{field}' must be an integer >= {minimum}"
                       + (" or absent (all)" if default is None else ""))
    return value


def _text(request: dict[str, Any], field: str) -> str | None:
    value = request.get(field)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"{request['op']}: '{field}' must be a string")
    return value


def answer(node: Node, request: object) -> dict[str, Any]:
    """The answer to one decoded request: commands go to the node's engine, questions to its view."""
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"ok": False, "error": 'request must be a JSON object with an "op" string'}
    op = request["op"]
    try:
        if op in ("pod-added", "pod-deleted"):
            network, container_id, ifname = _require_record_key(request)
            hold = request.get("hold", 0.0) if op == "pod-added" else 0.0
            if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= ADD_HOLD_MAX:
                raise ApiError(f"{op}: 'hold' must be 0..{ADD_HOLD_MAX:g} seconds")
            node.engine.pod_changed(network, container_id, ifname, hold=float(hold))
            return {"ok": True}
        if op == "check":
            ips = request.get("ips")
            if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
                raise ApiError("check: 'ips' must be a list of strings")
            return {"ok": True, **node.view.check(ips)}
        if op == "status":
            return {"ok": True, **node.view.status()}
        if op == "peers":
            offset = _integer(request, "offset", 0, 0) or 0
            limit, node_name = _integer(request, "limit", None, 1), _text(request, "node")
            # computed on the worker: it alone mutates the model
            return {"ok": True, **node.engine.on_worker(lambda: node.view.peers(offset, limit, node_name))}
        if op == "routes":
            limit, owner, after = _integer(request, "limit", None, 1), _text(request, "owner"), _text(request, "after")
            return {"ok": True, **node.engine.on_worker(lambda: node.view.routes(limit, owner, after))}
        if op == "pods":
            return {"ok": True, "pods": node.view.pods()}
        if op == "diagnose":
            return {"ok": True, **node.view.diagnose()}
        if op == "resync":
            node.engine.trigger_resync()
            return {"ok": True}
        if op == "rotate-key":
            return {"ok": True, **node.engine.rotate_key()}
    except (ApiError, KeyRotationError, KeyFileError) as error:
        return {"ok": False, "error": str(error)}
    except Exception as error:  # noqa: BLE001 - the server answers, logs, and keeps serving
        log.exception("local API %s failed", op)
        return {"ok": False, "error": f"{op} failed in the hook: {error}"}
    return {"ok": False, "error": f"unknown op {op!r}; known: pod-added, pod-deleted, check, status, peers, "
                                  "routes, pods, diagnose, resync, rotate-key"}


class _Server(socketserver.ThreadingUnixStreamServer):
    # kubelet starts many pods at once: with socketserver's default backlog of 5 a burst of plugin notifications is
    # refused and waits for the next record rescan instead of being applied at once.
    request_queue_size = 256
    daemon_threads = True


class LocalApiServer:
    def __init__(self, socket_path: Path, node: Node) -> None:
        self.socket_path = Path(socket_path)
        self.node = node
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        node = self.node

        class Handler(socketserver.StreamRequestHandler):
            timeout = 5

            def handle(self) -> None:
                try:
                    line = self.rfile.readline(MAX_REQUEST + 1)
                except OSError:
                    return
                if len(line) > MAX_REQUEST:
                    reply: dict[str, Any] = {"ok": False, "error": "request larger than 1 MiB"}
                else:
                    try:
                        reply = answer(node, json.loads(line))
                    except (ValueError, UnicodeDecodeError):
                        reply = {"ok": False, "error": "request is not one line of JSON"}
                try:
                    self.wfile.write(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

        self.socket_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._remove_stale_socket()
        old_umask = os.umask(0o177)
        try:
            server = _Server(str(self.socket_path), Handler)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="wgcni-local-api", daemon=True)
        self._thread.start()

    def _remove_stale_socket(self) -> None:
        if not self.socket_path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(str(self.socket_path))
        except OSError:
            self.socket_path.unlink(missing_ok=True)  # nobody listens: a leftover of a dead hook
            return
        finally:
            probe.close()
        raise ApiError(f"{self.socket_path}: another wgcni-node is already serving here")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self.socket_path.unlink(missing_ok=True)


def request(socket_path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the answer; raises OSError when the hook is not there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(str(socket_path))
        connection.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
