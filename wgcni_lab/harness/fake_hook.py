"""A fake node hook that speaks the hook's local API (docs/design.md) on a Unix socket, for plugin tests.

It behaves like the real hook towards the plugin: on ``pod-added`` it re-reads that pod's record from the record
store and counts its IPs as programmed, on ``pod-deleted`` it drops them, ``check`` answers from that set and
``status`` reports the readiness the test sets. Tests can also make it slow, mute or garbled to exercise the
plugin's bounded timeouts and error handling. Every request is kept in ``requests``.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
import time

from cni_plugin.records import RecordError, RecordStore


class FakeHook:
    """Serve the local API on ``socket_path`` in a background thread; use as a context manager."""

    def __init__(self, socket_path: str, state_dir: str | None = None) -> None:
        self.socket_path = socket_path
        self.store = RecordStore(state_dir) if state_dir else None
        self.ready = True
        self.dataplane_programmed = True
        self.status_message = "all peers programmed"
        self.answer_delay = 0.0  # seconds to wait before answering
        self.behaviour = "normal"  # "normal" | "close" (hang up without answering) | "garbage" | "refuse" (ok=false)
        self.programmed: dict[tuple[str, str, str], list[str]] = {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeHook:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        hook = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline()
                answer = hook._answer(line)
                if answer is not None:
                    try:
                        self.wfile.write(answer)
                    except OSError:
                        pass  # the client gave up waiting (its timeout), as a real hook sees it too

        class Server(socketserver.ThreadingUnixStreamServer):
            request_queue_size = 256  # kubelet starts many pods at once; the default backlog of 5 would refuse them
            daemon_threads = True

        old_umask = os.umask(0o177)  # the real hook's socket is 0600
        try:
            self._server = Server(self.socket_path, Handler)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None  # started with the server
            self._thread.join()
            self._server = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def ops(self) -> list[str | None]:
        with self._lock:
            return [request.get("op") for request in self.requests]

    def programmed_ips(self) -> set[str]:
        with self._lock:
            return {ip for ips in self.programmed.values() for ip in ips}

    def _answer(self, line: bytes) -> bytes | None:
        if self.answer_delay:
            time.sleep(self.answer_delay)
        try:
            request = json.loads(line)
        except ValueError:
            return _encode({"ok": False, "error": "request is not JSON"})
        with self._lock:
            self.requests.append(request)
        if self.behaviour == "close":
            return None
        if self.behaviour == "garbage":
            return b"this is not json\n"
        if self.behaviour == "refuse":
            return _encode({"ok": False, "error": "hook is shutting down"})
        return _encode(self._handle(request))

    def _handle(self, request: dict) -> dict:
        op = request.get("op")
        if op in ("pod-added", "pod-deleted"):
            network, container_id, ifname = request.get("network"), request.get("containerID"), request.get("ifname")
            if not (isinstance(network, str) and isinstance(container_id, str) and isinstance(ifname, str)):
                return {"ok": False, "error": f"{op} needs network, containerID and ifname"}
            key = (network, container_id, ifname)
            with self._lock:
                self.programmed.pop(key, None)
                if op == "pod-added" and self.store is not None:
                    try:
                        record = self.store.read(*key)
                    except RecordError as error:
                        return {"ok": False, "error": f"unreadable record: {error}"}
                    if record is not None:
                        self.programmed[key] = list(record["ips"])
            return {"ok": True}
        if op == "check":
            ips = request.get("ips")
            if not isinstance(ips, list):
                return {"ok": False, "error": "check needs ips"}
            programmed = self.programmed_ips()
            missing = [ip for ip in ips if ip not in programmed]
            return {"ok": True, "programmed": not missing, "missing": missing,
                    "message": "all programmed" if not missing else f"{len(missing)} IPs have no route to wireguard"}
        if op == "status":
            return {"ok": True, "ready": self.ready, "dataplane_programmed": self.dataplane_programmed,
                    "message": self.status_message}
        return {"ok": False, "error": f"unknown op {op!r}"}


def _encode(answer: dict) -> bytes:
    return json.dumps(answer).encode() + b"\n"
