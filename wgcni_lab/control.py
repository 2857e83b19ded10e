"""The control channel between `wgcni-lab` commands and the lab daemon (wgcni_lab.daemon), which owns every
long-lived lab process and so is the one that can restart, reboot, add or delete them.

Protocol: a Unix stream socket `<lab dir>/control.sock`; the client sends one request, one line of JSON
`{"op": NAME, ...arguments}`, and gets one line of JSON back: `{"ok": true, "result": ...}` or
`{"ok": false, "error": "one line"}`, then the daemon closes the connection. Requests are handled on their own
threads; the daemon serializes the lifecycle operations behind one lock (wgcni_lab.lifecycle.Cluster).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wgcni_lab.lab import LabError

CONTROL_SOCKET = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[dict[str, Any]], Any]


def socket_path(lab_dir: Path) -> Path:
    return lab_dir / CONTROL_SOCKET


def one_line(message: str) -> str:
    """A multi-line message (e.g. with a log tail) as one line: its first and last lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else "(no message)"


def answer(handlers: dict[str, Handler], line: bytes) -> dict[str, Any]:
    """The answer to one request line: the handler's result, or its error as one line."""
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "the request is not one line of JSON"}
    if not isinstance(request, dict) or request.get("op") not in handlers:
        return {"ok": False, "error": f"unknown request {request!r}; known ops: {', '.join(sorted(handlers))}"}
    try:
        return {"ok": True, "result": handlers[request["op"]](request)}
    except LabError as error:
        return {"ok": False, "error": one_line(str(error))}
    except Exception as error:  # noqa: BLE001 - the daemon keeps serving; the caller gets the one line
        return {"ok": False, "error": f"{type(error).__name__}: {one_line(str(error))}"}


class _RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES)
        reply = answer(self.server.handlers, line)  # type: ignore[attr-defined]
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class ControlServer:
    """Serves the control socket in the lab dir on a background thread until `stop()`."""

    def __init__(self, lab_dir: Path, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(lab_dir)
        self.path.unlink(missing_ok=True)
        self._server = _Server(str(self.path), _RequestHandler)
        self._server.handlers = handlers  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="lab-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def request(lab_dir: Path, op: str, timeout: float = 300.0, **arguments: Any) -> Any:
    """Send one request to the lab daemon and return its result; LabError with the daemon's one line on failure."""
    path = socket_path(lab_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(path))
            connection.sendall(json.dumps({"op": op, **arguments}).encode() + b"\n")
            reply = connection.makefile("rb").readline()
    except FileNotFoundError:
        raise LabError(f"the lab daemon has no control socket at {path}: is the lab up? (`wgcni-lab down` "
                       "removes what is left)") from None
    except TimeoutError:
        raise LabError(f"the lab daemon did not answer {op!r} within {timeout:g}s") from None
    except OSError as error:
        raise LabError(f"the lab daemon does not answer on {path}: {error.strerror or error}") from None
    try:
        decoded = json.loads(reply)
    except ValueError:
        raise LabError(f"the lab daemon closed the connection without an answer to {op!r}") from None
    if not decoded.get("ok"):
        raise LabError(decoded.get("error") or f"{op} failed")
    return decoded.get("result")
