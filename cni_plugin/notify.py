"""Client of the node hook's local API (docs/design.md): one JSON request per Unix-socket connection.

Standard library only, every call bounded by one overall deadline (connect + send + answer), because the plugin
runs on kubelet's pod-creation path and the record, not the notification, is the source of truth.

It uses ``_socket``, the C socket type that ``socket.socket`` wraps, because ``import socket`` pulls in selectors
and enum on every plugin start (docs/benchmarks.md, P1); a Unix stream client needs nothing the wrapper adds.
"""

import _socket
import time

from cni_plugin import cjson

NOTIFY_TIMEOUT_SECONDS = 0.25  # design.md: connect + answer <= 250 ms for notifications
QUERY_TIMEOUT_SECONDS = 2.0  # CHECK / STATUS ask the hook a question and wait a little longer for the answer
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class HookUnavailable(Exception):
    """The hook could not be reached or did not answer in time (not running, socket missing, overloaded)."""


class HookProtocolError(Exception):
    """The hook answered something that is not a valid local-API answer."""


def request(socket_path: str, message: dict, timeout: float) -> dict:
    """Send ``message`` to the hook and return its answer object (which always carries ``ok``)."""
    return send(socket_path, message, timeout).answer()


def send(socket_path: str, message: dict, timeout: float) -> "Pending":
    """Connect and send ``message``; the answer is read by ``Pending.answer()`` within the same ``timeout``, so the
    caller can do other work (the plugin syncs the record's directory) while the hook handles the request."""
    deadline = time.monotonic() + timeout
    payload = cjson.dumps(message).encode() + b"\n"
    try:
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            conn.settimeout(timeout)
            conn.connect(socket_path)
            conn.settimeout(_remaining(deadline))
            conn.sendall(payload)
        except BaseException:
            conn.close()
            raise
    except (TimeoutError, OSError) as error:
        raise _unavailable(error, socket_path, timeout) from None
    return Pending(conn, deadline, socket_path, timeout)


class Pending:
    """A request sent to the hook whose answer is not read yet."""

    __slots__ = ("_conn", "_deadline", "_socket_path", "_timeout")

    def __init__(self, conn: "_socket.socket", deadline: float, socket_path: str, timeout: float) -> None:
        self._conn = conn
        self._deadline = deadline
        self._socket_path = socket_path
        self._timeout = timeout

    def close(self) -> None:
        self._conn.close()

    def answer(self) -> dict:
        """The hook's answer object; the connection is closed afterwards."""
        try:
            try:
                answer = bytearray()
                while b"\n" not in answer:
                    self._conn.settimeout(_remaining(self._deadline))
                    chunk = self._conn.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                    if len(answer) > MAX_ANSWER_BYTES:
                        raise HookProtocolError(f"answer larger than {MAX_ANSWER_BYTES} bytes")
            finally:
                self._conn.close()
        except (TimeoutError, OSError) as error:
            raise _unavailable(error, self._socket_path, self._timeout) from None
        line = bytes(answer).split(b"\n", 1)[0]
        if not line:
            raise HookUnavailable(f"hook closed {self._socket_path} without answering")
        try:
            decoded = cjson.loads(line)
        except (ValueError, RecursionError) as error:
            raise HookProtocolError(f"answer is not JSON: {error}") from None
        if not isinstance(decoded, dict) or not isinstance(decoded.get("ok"), bool):
            raise HookProtocolError("answer is not a JSON object with a boolean 'ok'")
        return decoded


def _unavailable(error: BaseException, socket_path: str, timeout: float) -> HookUnavailable:
    if isinstance(error, TimeoutError):
        return HookUnavailable(f"no answer within {timeout * 1000:.0f} ms on {socket_path}")
    if isinstance(error, FileNotFoundError):
        return HookUnavailable(f"socket {socket_path} does not exist")
    if isinstance(error, ConnectionRefusedError):
        return HookUnavailable(f"nothing listens on {socket_path}")
    assert isinstance(error, OSError)
    return HookUnavailable(f"cannot talk to {socket_path}: {error.strerror or error}")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
