"""The local inference endpoint: a Unix socket speaking length-prefixed JSON.

For applications on the device that are not Python. Each frame is a 4-byte big-endian
unsigned length followed by that many bytes of UTF-8 JSON; the connection stays open for
any number of request/reply pairs.

Requests::

    {"op": "predict", "features": [0.1, 2.3, ...], "id": <anything, echoed>}
    {"op": "status"}

Replies::

    {"ok": true, "id": ..., "label": "normal", "index": 0, "logits": [...], "latency_ms": 0.05}
    {"ok": true, "status": {...the retained state message...}}
    {"ok": false, "id": ..., "error": {"type": "TensorInputError", "message": "input feature 3 is nan; ..."}}

A frame over 1 MiB, or a length prefix that cannot be read, closes the connection (the
stream cannot be resynchronized); malformed JSON or a bad request gets an error reply and
the connection stays usable. The socket file is created mode 0660 inside the data
directory: local access control is the file system's.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

from edgeops_agent.agent import Agent
from edgeops_core import EdgeopsError

__all__ = ["MAX_FRAME", "EndpointServer", "recv_frame", "send_frame"]

log = logging.getLogger(__name__)

#: Largest request or reply frame (bytes).
MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">I")


def send_frame(sock: Any, obj: Any) -> None:
    """Write one frame."""
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
        while True:
            try:
                payload = recv_frame(self.request)
            except (ValueError, OSError) as exc:
                log.info("closing endpoint connection: %s", exc)
                return
            if payload is None:
                return
            try:
                send_frame(self.request, self.server.answer(payload))
            except OSError:
                return


class EndpointServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves :class:`Agent` predictions on a Unix socket."""

    daemon_threads = True

    def __init__(self, path: Path, agent: Agent) -> None:
        """Bind ``path`` (a stale socket file from a crashed run is replaced)."""
        self.agent = agent
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
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

    def answer(self, payload: bytes) -> dict[str, Any]:
        """The reply to one request frame (never raises)."""
        try:
            request = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return _error(None, "RequestError", f"request is not UTF-8 JSON: {exc}")
        if not isinstance(request, dict):
            return _error(None, "RequestError", f"request must be a JSON object, got {type(request).__name__}")
        rid = request.get("id")
        op = request.get("op")
        if op == "status":
            return {"ok": True, "id": rid, "status": self.agent.state_message(online=True)}
        if op != "predict":
            return _error(rid, "RequestError", f"'op' must be 'predict' or 'status', got {op!r}")
        features = request.get("features")
        if not isinstance(features, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in features):
            self.agent.count_error("TensorInputError")
            return _error(rid, "TensorInputError", "'features' must be a list of numbers")
        import numpy as np

        try:
            result = self.agent.predict(np.asarray(features, dtype=np.float32))
        except EdgeopsError as exc:
            return _error(rid, type(exc).__name__, str(exc))
        return {"ok": True, "id": rid, **result.to_dict()}


def _error(rid: Any, kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "id": rid, "error": {"type": kind, "message": message}}
