"""The local inference endpoint: a Unix socket speaking length-prefixed frames.

For applications on the device that are not Python. Each frame is a 4-byte big-endian
unsigned length followed by that many bytes of payload; the connection stays open for
any number of request/reply pairs. A request payload is UTF-8 JSON (it starts with ``{``)
or, for large inputs, binary (it starts with the byte ``0x00``); every reply is JSON.

JSON requests::

    {"op": "predict", "features": [0.1, 2.3, ...], "id": <anything, echoed>}
    {"op": "predict", "features": [[[0.0, 0.5, ...], ...]], "id": ...}       (an N-d input: nested arrays)
    {"op": "predict_batch", "rows": [[0.1, ...], [...], ...], "id": ...}   (at most 1 024 rows)
    {"op": "feedback", "prediction_id": 1099511627777, "label": "normal"}   (or the label's index)
    {"op": "status"}

``features`` has the model's ``sample_shape`` or ``[1, *sample_shape]`` (a flat model:
``[features]``), ``rows`` is ``[n, *sample_shape]``.

Binary requests (``predict`` and ``predict_batch`` only)::

    0x00 | header length H (4 bytes, big-endian) | H bytes of UTF-8 JSON header | raw tensor bytes
    header: {"op": "predict", "id": 7, "dtype": "<f4", "shape": [1, 8, 8]}

The tensor is float32 little-endian (``dtype`` must be ``"<f4"``), C order, exactly
``prod(shape) * 4`` bytes. :func:`tensor_payload` builds one. A wrong dtype, a shape that is
not a list of 1 to 5 positive integers, or a byte count that is not the shape's gets a
``TensorInputError`` reply; a header that cannot be read (too short, longer than the
payload or :data:`MAX_BINARY_HEADER`, not a JSON object, unknown fields) a ``RequestError``.
Nothing is allocated from the header before the byte count is checked against it.

Replies::

    {"ok": true, "id": ..., "task": "classification", "label": "normal", "index": 0, "logits": [...],
     "latency_ms": 0.05, "prediction_id": 1099511627777}
    {"ok": true, "id": ..., "task": "regression", "values": {"rul_h": 41.5}, "latency_ms": ..., "prediction_id": ...}
    {"ok": true, "id": ..., "task": "anomaly", "score": 0.41, "threshold": 0.32, "anomaly": true, "latency_ms": ...,
     "prediction_id": ...}
    {"ok": true, "id": ..., "correct": true}
    {"ok": true, "id": ..., "predictions": [{"task": ..., "label": ..., "index": ..., "logits": [...], ...}, ...]}
    {"ok": true, "status": {...the retained state message...}}
    {"ok": false, "id": ..., "error": {"type": "TensorInputError", "message": "input feature 3 is nan; ..."}}

Every request frame gets exactly one reply, whatever it holds (a number too large for a
float, JSON nested too deep to parse, an ``id`` that cannot be echoed): bad requests get an
error reply, and the connection stays usable. A frame over 1 MiB, or a length prefix that
cannot be read, closes the connection (the stream cannot be resynchronized). Nothing a
client sends prints a traceback.

Resources are bounded: at most ``max_connections`` connections are served at once (one
thread each); a connection past the bound gets one ``{"ok": false, "error": {"type":
"Busy"}}`` frame and is closed, and is counted in :attr:`EndpointServer.refused`. A
connection idle for ``idle_timeout_s`` is closed. The listen backlog is 128, so a burst of
connects queues in the kernel instead of failing with ``EAGAIN``. The socket file is
created mode 0660 inside the data directory: local access control is the file system's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socketserver
import stat
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from edgeops_agent.agent import Agent
from edgeops_agent.errors import ConfigError
from edgeops_core import EdgeopsError

__all__ = [
    "BINARY_DTYPE",
    "MAX_BATCH",
    "MAX_BINARY_HEADER",
    "MAX_FRAME",
    "BoundedThreadingMixIn",
    "EndpointServer",
    "json_tensor",
    "recv_frame",
    "send_frame",
    "send_tensor_frame",
    "tensor_payload",
]

log = logging.getLogger(__name__)

#: Largest request or reply frame (bytes).
MAX_FRAME = 1 << 20
#: Most rows in one ``predict_batch`` request.
MAX_BATCH = 1024
#: Connections served at once, by default (each holds one thread).
MAX_CONNECTIONS = 64
#: Seconds a connection may stay idle (or stall mid-frame) before it is closed, by default.
IDLE_TIMEOUT_S = 60.0
#: The listen backlog: connects beyond it fail with EAGAIN before the server sees them.
BACKLOG = 128
_HEADER = struct.Struct(">I")
_NUMBER = (int, float)
#: The first byte of a binary request payload (a JSON request starts with "{" or white space).
_BINARY = b"\x00"
#: The one tensor dtype a binary request may carry: float32, little-endian (numpy's notation).
BINARY_DTYPE = "<f4"
#: Largest JSON header of a binary request (bytes).
MAX_BINARY_HEADER = 4096
#: Most axes of a tensor in a request: the batch axis and a sample of at most 4.
_MAX_NDIM = 5
_BINARY_KEYS = ("op", "id", "dtype", "shape")


def tensor_payload(header: dict[str, Any], tensor: Any) -> bytes:
    """A binary request payload: ``0x00``, the header's length, the header with ``dtype`` and
    ``shape`` filled in from ``tensor``, then the tensor as float32 little-endian bytes.

    ``header`` holds ``op`` (``predict`` or ``predict_batch``) and optionally ``id``.
    """
    import numpy as np

    x = np.ascontiguousarray(tensor, dtype=BINARY_DTYPE)
    head = json.dumps({**header, "dtype": BINARY_DTYPE, "shape": list(x.shape)}, separators=(",", ":")).encode()
    return _BINARY + _HEADER.pack(len(head)) + head + x.tobytes()


def send_tensor_frame(sock: Any, header: dict[str, Any], tensor: Any) -> None:
    """Write one binary request frame (:func:`tensor_payload`)."""
    payload = tensor_payload(header, tensor)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def send_frame(sock: Any, obj: Any) -> None:
    """Write one frame holding ``obj`` as JSON."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: Any, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: Any) -> bytes | None:
    """Read one frame's payload; ``None`` at a clean end of stream.

    Raises:
        ValueError: the announced length is over :data:`MAX_FRAME` or the stream ends mid-frame.
    """
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    payload = _recv_exact(sock, length)
    if payload is None:
        raise ValueError("stream ended inside a frame")
    return payload


class _Handler(socketserver.BaseRequestHandler):
    server: EndpointServer

    def handle(self) -> None:
        self.request.settimeout(self.server.idle_timeout_s)
        while True:
            try:
                payload = recv_frame(self.request)
            except (ValueError, OSError) as exc:  # OSError includes the idle timeout
                log.debug("closing endpoint connection: %s", exc)
                return
            if payload is None:
                return
            try:
                self.request.sendall(self.server.reply(payload))
            except OSError:
                return


class BoundedThreadingMixIn(socketserver.ThreadingMixIn):
    """A thread per connection, at most ``max_connections`` at once (the endpoint and the
    metrics listener): one more gets :meth:`busy_reply` and is closed, counted in ``refused``.

    Call :meth:`_init_bounds` before the server's own ``__init__``.
    """

    daemon_threads = True
    max_connections: int
    refused: int

    def _init_bounds(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.refused = 0
        self._open = 0
        self._count_lock = threading.Lock()

    def busy_reply(self) -> bytes:
        """The bytes a refused connection gets before it is closed."""
        raise NotImplementedError

    def on_refused(self) -> None:
        """Called after a connection was refused (``refused`` counts it already)."""

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the connection, or refuse it past the bound."""
        with self._count_lock:
            busy = self._open >= self.max_connections
            if busy:
                self.refused += 1
            else:
                self._open += 1
        if busy:
            self.on_refused()
            try:
                request.settimeout(0.1)  # a fresh socket's buffer takes the small reply at once
                request.sendall(self.busy_reply())
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # noqa: BLE001 - e.g. no thread could be started: drop the connection, free its place
            self._release()
            log.warning("%s could not start a connection thread", type(self).__name__, exc_info=False)
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its place."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self._open -= 1


class EndpointServer(BoundedThreadingMixIn, socketserver.UnixStreamServer):
    """Serves :class:`Agent` predictions on a Unix socket, with bounded connections.

    Attributes:
        refused: connections refused because ``max_connections`` were already open.
    """

    request_queue_size = BACKLOG

    def __init__(
        self, path: Path, agent: Agent, *, max_connections: int = MAX_CONNECTIONS, idle_timeout_s: float = IDLE_TIMEOUT_S
    ) -> None:
        """Bind ``path`` (a stale socket file from a crashed run is replaced; anything else there is refused).

        Raises:
            ConfigError: something other than a socket exists at ``path``.

        Args:
            max_connections: connections served at once; more are refused with a ``Busy`` reply.
            idle_timeout_s: an open connection that sends nothing for this long is closed.
        """
        self.agent = agent
        self.path = path
        self.idle_timeout_s = idle_timeout_s
        self._init_bounds(max_connections)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o660)
        self._thread = threading.Thread(target=self.serve_forever, name="edgeops-endpoint", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)

    def busy_reply(self) -> bytes:
        """One ``Busy`` frame."""
        return _encode(_error(None, "Busy", f"{self.max_connections} connections are open; try again later"))

    def on_refused(self) -> None:
        """A warning at the first refusal and every 1000th (a flood must not flood the log)."""
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("endpoint refused a connection: %d open (the maximum); %d refused so far", self._open, self.refused)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line, never a traceback on stderr (any local client could flood it)."""
        exc = sys.exc_info()[1]
        log.warning("endpoint connection failed: %s: %.200s", type(exc).__name__, exc)

    def reply(self, payload: bytes) -> bytes:
        """The encoded reply frame (header included) to one request frame; never raises."""
        try:
            answer = self.answer(payload)
        except Exception as exc:  # noqa: BLE001 - a request must never take the connection down
            log.warning("endpoint request failed: %s: %.200s", type(exc).__name__, exc)
            answer = _error(None, "InternalError", f"{type(exc).__name__}: {str(exc)[:200]}")
        return _encode(answer)

    def _request_error(self, rid: Any, message: str) -> dict[str, Any]:
        """A ``RequestError`` reply (not a frame the agent understands), counted like other rejections."""
        self.agent.count_error("RequestError")
        return _error(rid, "RequestError", message)

    def _tensor_error(self, rid: Any, message: str) -> dict[str, Any]:
        """A ``TensorInputError`` reply to an input the agent never saw, counted like the agent's own."""
        self.agent.count_error("TensorInputError")
        return _error(rid, "TensorInputError", message)

    def answer(self, payload: bytes) -> dict[str, Any]:
        """The reply to one request frame (raises only on an agent bug)."""
        if payload[:1] == _BINARY:
            return self._answer_binary(payload)
        try:
            request = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return self._request_error(None, f"request is not UTF-8 JSON: {str(exc)[:200]}")
        except RecursionError:
            return self._request_error(None, "request JSON is nested too deeply")
        if not isinstance(request, dict):
            return self._request_error(None, f"request must be a JSON object, got {type(request).__name__}")
        rid = request.get("id")
        op = request.get("op")
        if op == "status":
            return {"ok": True, "id": rid, "status": self.agent.state_message(online=True)}
        if op == "predict":
            x = json_tensor(request.get("features"))
            if x is None:
                return self._tensor_error(
                    rid, "'features' must be an array (nested for an N-d input) of numbers that fit a float32"
                )
            return self._predict(rid, x)
        if op == "feedback":
            try:
                correct = self.agent.feedback(request.get("prediction_id"), request.get("label"))  # type: ignore[arg-type]
            except EdgeopsError as exc:
                return _error(rid, type(exc).__name__, str(exc))
            return {"ok": True, "id": rid, "correct": correct}
        if op == "predict_batch":
            rows = request.get("rows")
            if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_BATCH:
                return self._tensor_error(rid, f"'rows' must be a list of 1 to {MAX_BATCH} inputs")
            x = json_tensor(rows)
            if x is None:
                bad = next((i for i, r in enumerate(rows) if json_tensor(r) is None), None)
                if bad is not None:
                    return self._tensor_error(
                        rid, f"row {bad} must be an array (nested for an N-d input) of numbers that fit a float32"
                    )
                return self._tensor_error(rid, "'rows' must all have the shape of row 0")
            return self._predict_batch(rid, x)
        return self._request_error(rid, f"'op' must be 'predict', 'predict_batch', 'feedback' or 'status', got {str(op)[:80]!r}")

    def _predict(self, rid: Any, x: Any) -> dict[str, Any]:
        try:
            result = self.agent.predict(x)
        except EdgeopsError as exc:
            return _error(rid, type(exc).__name__, str(exc))
        return {"ok": True, "id": rid, **result.to_dict()}

    def _predict_batch(self, rid: Any, x: Any) -> dict[str, Any]:
        try:
            predictions = self.agent.predict_batch(x)
        except EdgeopsError as exc:
            return _error(rid, type(exc).__name__, str(exc))
        return {"ok": True, "id": rid, "predictions": [p.to_dict() for p in predictions]}

    def _answer_binary(self, payload: bytes) -> dict[str, Any]:
        """The reply to a binary request (module docstring): every check before the tensor is read."""
        import numpy as np

        start = 1 + _HEADER.size
        if len(payload) < start:
            return self._request_error(None, f"binary request of {len(payload)} bytes is shorter than its {start}-byte preamble")
        (size,) = _HEADER.unpack_from(payload, 1)
        if size > MAX_BINARY_HEADER or start + size > len(payload):
            return self._request_error(
                None,
                f"binary request header of {size} bytes does not fit: {len(payload) - start} bytes follow the preamble, "
                f"and a header has at most {MAX_BINARY_HEADER}",
            )
        try:
            header = json.loads(payload[start : start + size].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return self._request_error(None, f"binary request header is not UTF-8 JSON: {str(exc)[:200]}")
        if not isinstance(header, dict):
            return self._request_error(None, f"binary request header must be a JSON object, got {type(header).__name__}")
        rid = header.get("id")
        unknown = sorted(set(header) - set(_BINARY_KEYS))
        if unknown:
            return self._request_error(
                rid, f"binary request header has unknown fields {unknown[:8]}; it takes {list(_BINARY_KEYS)}"
            )
        op = header.get("op")
        if op not in ("predict", "predict_batch"):
            return self._request_error(rid, f"a binary request's 'op' must be 'predict' or 'predict_batch', got {str(op)[:80]!r}")
        dtype = header.get("dtype")
        if dtype != BINARY_DTYPE:
            return self._tensor_error(rid, f"'dtype' must be {BINARY_DTYPE!r} (float32, little-endian), got {str(dtype)[:40]!r}")
        shape = header.get("shape")
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        ):
            return self._tensor_error(rid, f"'shape' must be a list of 1 to {_MAX_NDIM} positive integers, got {str(shape)[:80]}")
        data = memoryview(payload)[start + size :]
        need = math.prod(shape) * 4  # Python integers: a huge shape cannot overflow
        if need != len(data):
            return self._tensor_error(
                rid, f"shape {str(shape)[:80]} of {BINARY_DTYPE} needs {str(need)[:40]} bytes of tensor data, got {len(data)}"
            )
        x = np.frombuffer(data, dtype=BINARY_DTYPE).reshape(shape)
        if op == "predict":
            return self._predict(rid, x)
        if shape[0] > MAX_BATCH:
            return self._tensor_error(rid, f"a predict_batch takes at most {MAX_BATCH} rows, got {shape[0]}")
        return self._predict_batch(rid, x)


def json_tensor(values: Any) -> Any:
    """``values`` (parsed JSON) as a float32 array if it is an array, nested at most 5 deep, of
    non-bool numbers that fit a float32 and not ragged; else ``None``."""
    import numpy as np

    if not isinstance(values, list):
        return None
    frontier: list[Any] = values
    for _ in range(_MAX_NDIM):
        kinds = set(map(type, frontier))
        if kinds <= {int, float}:  # the leaves (a flat vector's first level)
            break
        if kinds != {list}:
            return None
        frontier = [v for sub in frontier for v in sub]
    else:
        return None
    try:
        with np.errstate(over="raise"):
            return np.asarray(values, dtype=np.float32)
    except (OverflowError, FloatingPointError, ValueError):  # ValueError: ragged
        return None


def _encode(reply: dict[str, Any]) -> bytes:
    """One frame for ``reply``; an ``id`` that cannot be encoded back is replaced by ``null``."""
    try:
        data = json.dumps(reply, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        data = json.dumps({**reply, "id": None}, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


def _error(rid: Any, kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "id": rid, "error": {"type": kind, "message": message}}


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket a crashed run left at ``path``; never a file, link or folder of someone else's."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"endpoint socket path {path} exists and is not a socket; refusing to replace it")
    path.unlink()
