"""The console's HTTP JSON API (and the dashboard's pages, on the same Starlette app).

Routes (docs/console.md has the reference)::

    GET  /api/health                           console, broker link, schema version
    GET  /api/stats                            store counters + the console's own
    GET  /api/devices?target=T&tag=k=v...      the fleet table
    GET  /api/devices/{id}                     one device and its gaps
    GET  /api/devices/{id}/history?since=&kinds=&limit=
    GET  /api/rejects?limit=                   messages refused at ingest
    GET  /api/rollouts                         every rollout (newest first)
    GET  /api/rollouts/{id}                    one rollout with its waves and devices
    POST /api/rollouts                         start one (201)
    POST /api/rollouts/{id}/pause|resume|abort

Invariants:

- With a token configured, every request carries it: ``Authorization: Bearer TOKEN``, or
  the HttpOnly, SameSite=Strict cookie a browser gets by opening any page once with
  ``?token=TOKEN``. Tokens are compared in constant time. Without one: 401, nothing else.
- Every error is a JSON object ``{"error": "..."}`` with a 4xx status (400 bad input, 401
  no token, 404 unknown, 409 conflicts with the fleet's state, 413 too large) or 503 when
  the database is unavailable. A request never gets a traceback.
- Request bodies are read up to :data:`MAX_BODY_BYTES` and parsed with the bounded JSON
  parser devices' payloads go through.
- ``POST /api/rollouts`` verifies the bundle with the given key before anything else, then
  copies it (temp file, fsync, rename) to ``<bundles_dir>/<sha256>.edgeops`` so the rollout
  no longer depends on the original path, registers the release, and only then starts it.
"""

from __future__ import annotations

import hmac
import math
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from edgeops_core import (
    BundleError,
    EdgeopsError,
    InputError,
    TrustedKey,
    VerifiedBundleFile,
    check_device_id,
    verify_bundle_file,
)
from edgeops_core._json import load_untrusted_json
from edgeops_core.digest import sha256_new
from edgeops_fleet.errors import FleetError, RunConflictError, StoreError
from edgeops_fleet.rollout import RolloutConflictError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from edgeops_fleet.autopilot import Autopilot
    from edgeops_fleet.rollout import RolloutEngine, RolloutSpec
    from edgeops_fleet.store import Store

__all__ = ["COOKIE_NAME", "MAX_BODY_BYTES", "ApiError", "create_app", "parse_since"]

#: Largest request body read (bytes).
MAX_BODY_BYTES = 1024 * 1024
#: The dashboard's session cookie (holds the token; HttpOnly, SameSite=Strict).
COOKIE_NAME = "edgeops_console_token"
_ROLLOUT_FIELDS = ("bundle", "key", "group", "waves", "soak", "gates", "deadline", "allow_bad")
_KINDS = ("state", "telemetry", "event")
_MAX_LIMIT = 100_000

ConsoleInfo = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class ApiError(FleetError):
    """A request the API refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_of(exc: Exception) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, StoreError):
        return 503
    if isinstance(exc, LookupError):
        return 404
    if isinstance(exc, RolloutConflictError | RunConflictError):
        return 409
    if isinstance(exc, InputError | BundleError):
        return 400
    if isinstance(exc, EdgeopsError):
        return 409
    raise exc


def parse_since(text: str, *, now: float | None = None) -> float:
    """A ``since`` value → epoch seconds: epoch seconds, an ISO 8601 time, or a duration ago (``10m``).

    Raises:
        InputError: none of these.
    """
    from edgeops_fleet.rollout import parse_duration

    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(number) and number >= 0:
            return number
        raise InputError(f"since must be epoch seconds >= 0, an ISO time or a duration, got {text!r}")
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            return (time.time() if now is None else now) - parse_duration(value)
        except InputError as exc:
            raise InputError(
                f"since must be epoch seconds, an ISO time (2026-01-31T12:00:00Z) or a duration (10m, 2h), got {text!r}"
            ) from exc
    if stamp.tzinfo is None:
        raise InputError(f"since {text!r} has no time zone; add Z or +00:00")
    return stamp.timestamp()


def _tags(values: Sequence[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(f"tag must be KEY=VALUE, got {item!r}")
        tags[key] = value
    return tags


def _query_int(request: Request, name: str, default: int, *, maximum: int = _MAX_LIMIT) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
    if not (text.isascii() and text.isdigit() and len(text) <= 20) or not 1 <= int(text) <= maximum:
        raise InputError(f"{name} must be an integer 1..{maximum}, got {text!r}")
    return int(text)


async def _read_json(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit() and int(length) <= MAX_BODY_BYTES):
        raise ApiError(413, f"the request body must be at most {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body must be at most {MAX_BODY_BYTES} bytes")
    try:
        return load_untrusted_json(bytes(body))
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc


def keep_for_rollout(store: Store, verified: VerifiedBundleFile, bundles_dir: Path, **options: Any) -> RolloutSpec:
    """Keep a verified bundle in ``bundles_dir``, register its release, and return its rollout spec.

    ``options`` are the spec's group, waves, soak_s, gates, deadline_s, allow_bad. The API's
    rollout requests and the autopilot start rollouts this one way.
    """
    from edgeops_fleet.rollout import RolloutSpec

    kept = _copy_verified(verified, bundles_dir)
    m = verified.manifest
    store.put_release(
        name=m.name, target=m.target, release=m.release, version=m.version, sha256=verified.digest, bundle_path=str(kept)
    )
    return RolloutSpec(
        bundle_path=kept,
        name=m.name,
        version=m.version,
        release=m.release,
        target=m.target,
        sha256=verified.digest,
        size=verified.size,
        **options,
    )


def _copy_verified(verified: VerifiedBundleFile, bundles_dir: Path) -> Path:
    """Copy a verified bundle to ``bundles_dir/<sha256>.edgeops`` atomically; the copy's path.

    The bytes are hashed while copied: a file changed since it was verified is refused. The
    path may have been swapped since: it is opened without blocking (a FIFO), must still be a
    regular file of the verified size, and at most that many bytes + 1 are read (``/dev/zero``).
    """
    dest = bundles_dir / f"{verified.digest}.edgeops"
    if dest.is_file() and _file_digest(dest) == verified.digest:
        return dest
    bundles_dir.mkdir(parents=True, exist_ok=True)
    digest = sha256_new()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{verified.digest[:16]}.", suffix=".tmp", dir=bundles_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _open_regular(verified.path, verified.size) as src:
            left = verified.size + 1
            while left > 0 and (chunk := src.read(min(1 << 20, left))):
                left -= len(chunk)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if left <= 0 or digest.hexdigest() != verified.digest:
            raise ApiError(409, f"{verified.path}: the file changed since it was verified; start the rollout again")
        os.replace(tmp, dest)
    except OSError as exc:
        raise FleetError(f"cannot copy the bundle to {bundles_dir}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(bundles_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return dest


def _open_regular(path: Path, size: int) -> Any:
    """``path`` opened for reading if it is (still) a regular file of ``size`` bytes.

    Raises:
        ApiError: 409, it is something else now (the rollout must be started again).
        OSError: it cannot be opened.
    """
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ApiError(409, f"{path}: the file changed since it was verified; start the rollout again")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_digest(path: Path) -> str:
    digest = sha256_new()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return str(digest.hexdigest())


class _TokenGuard:
    """ASGI middleware: the bearer token or the cookie, else 401 (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._token = token.encode()

    def _ok(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and self._ok(value.strip()):
            await self.app(scope, receive, send)
            return
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no cookie
            cookie = SimpleCookie()
        morsel = cookie.get(COOKIE_NAME)
        if morsel is not None and self._ok(morsel.value):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "/")
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given and self._ok(given[-1]) and not path.startswith("/api/") and scope.get("method") == "GET":
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            response: Response = Response(status_code=303, headers={"location": path + (f"?{rest}" if rest else "")})
            response.set_cookie(COOKIE_NAME, self._token.decode(), httponly=True, samesite="strict", path="/")
        elif path.startswith("/api/") or path == "/api":
            response = JSONResponse(
                {"error": "a token is required: send Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"www-authenticate": "Bearer"},
            )
        else:
            response = Response(
                "401: this console needs its token; open the page once with ?token=TOKEN\n",
                status_code=401,
                media_type="text/plain",
                headers={"www-authenticate": "Bearer"},
            )
        await response(scope, receive, send)


class _Api:
    """The JSON endpoints over one store and one engine."""

    def __init__(
        self,
        store: Store,
        engine: RolloutEngine | None,
        *,
        console_info: ConsoleInfo,
        bundles_dir: Path | None,
        trusted: Sequence[TrustedKey],
    ) -> None:
        self.store, self.engine = store, engine
        self.console_info, self.bundles_dir, self.trusted = console_info, bundles_dir, tuple(trusted)

    def _engine(self) -> RolloutEngine:
        if self.engine is None:
            raise ApiError(409, "this console runs without a rollout engine")
        return self.engine

    # -- reads (sync: Starlette runs them in its thread pool, away from the event loop) -----------

    def health(self) -> dict[str, Any]:
        info = self.console_info() if callable(self.console_info) else self.console_info
        return {"ok": True, "time": time.time(), "schema_version": self.store.schema_version(), "console": dict(info)}

    def stats(self) -> dict[str, Any]:
        info = self.console_info() if callable(self.console_info) else self.console_info
        return {"store": self.store.stats(), "console": dict(info).get("counters", {})}

    def devices(self, request: Request) -> dict[str, Any]:
        target = request.query_params.get("target") or None
        tags = _tags(request.query_params.getlist("tag"))
        return {"devices": self._with_known(self.store.devices(target=target, tags=tags or None))}

    def device(self, device_id: str) -> dict[str, Any]:
        row = self.store.device(check_device_id(device_id))
        if row is None:
            raise ApiError(404, f"no device {device_id!r} is known to this console")
        return {"device": self._with_known([row])[0], "gaps": [list(g) for g in self.store.gaps(device_id)]}

    def _with_known(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each row with ``release_known``: whether the console has a record of the release the
        device reports (a bundle it rolled out), ``None`` when the device reports none."""
        known = {(str(r["name"]), int(r["release"])) for r in self.store.releases()}
        for row in rows:
            model, release = row.get("model"), row.get("release")
            row["release_known"] = None if model is None or release is None else (str(model), int(release)) in known
        return rows

    def history(self, device_id: str, request: Request) -> dict[str, Any]:
        check_device_id(device_id)
        since_text = request.query_params.get("since")
        since = None if not since_text else parse_since(since_text)
        kinds_text = request.query_params.get("kinds")
        kinds = None
        if kinds_text:
            kinds = [k.strip() for k in kinds_text.split(",") if k.strip()]
            bad = [k for k in kinds if k not in _KINDS]
            if bad:
                raise InputError(f"kinds must be among {', '.join(_KINDS)}, got {', '.join(bad)}")
        limit = _query_int(request, "limit", 1000)
        if self.store.device(device_id) is None:
            raise ApiError(404, f"no device {device_id!r} is known to this console")
        rows = self.store.history(device_id, since=since, kinds=kinds, limit=limit)
        return {"device_id": device_id, "history": rows, "gaps": [list(g) for g in self.store.gaps(device_id)]}

    def rejects(self, request: Request) -> dict[str, Any]:
        return {"rejects": self.store.rejects(limit=_query_int(request, "limit", 100, maximum=10_000))}

    def rollouts(self) -> dict[str, Any]:
        summaries = self._engine().status()
        rows = [s["rollout"] if isinstance(s, dict) and "rollout" in s else s for s in summaries]
        return {"rollouts": rows}

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        if self.store.rollout(rollout_id) is None:
            raise ApiError(404, f"no rollout {rollout_id!r}")
        status = self._engine().status(rollout_id)
        if not isinstance(status, dict):
            raise ApiError(404, f"no rollout {rollout_id!r}")
        return status  # {"rollout": row, "waves": [...], "devices": [...]}

    def act(self, rollout_id: str, action: str) -> dict[str, Any]:
        if self.store.rollout(rollout_id) is None:
            raise ApiError(404, f"no rollout {rollout_id!r}")
        engine = self._engine()
        try:
            row = {"pause": engine.pause, "resume": engine.resume, "abort": engine.abort}[action](rollout_id)
        except InputError as exc:  # the rollout exists: refusing the action is a conflict with its state
            raise ApiError(409, str(exc)) from exc
        return {"rollout": row}

    # -- start a rollout ------------------------------------------------------------------------

    def start(self, body: Any) -> dict[str, Any]:
        from edgeops_fleet.rollout import Gates, parse_duration, parse_waves

        engine = self._engine()
        if self.bundles_dir is None:
            raise ApiError(409, "this console has no bundles folder to keep rollout bundles in")
        if not isinstance(body, dict):
            raise InputError(f"the request body must be a JSON object with {', '.join(_ROLLOUT_FIELDS)}")
        unknown = sorted(set(body) - set(_ROLLOUT_FIELDS))
        missing = [k for k in ("bundle", "group", "waves", "soak") if k not in body]
        if unknown or missing:
            raise InputError(f"rollout request: missing fields {missing}, unknown fields {unknown}")
        bundle = body["bundle"]
        if not isinstance(bundle, str) or not Path(bundle).is_absolute():
            raise InputError(f"bundle must be an absolute path on the console's machine, got {bundle!r}")
        group = _group(body["group"])
        waves_raw = body["waves"]
        if isinstance(waves_raw, list) and all(isinstance(w, str | int) and not isinstance(w, bool) for w in waves_raw):
            waves_raw = ",".join(str(w) for w in waves_raw)
        if not isinstance(waves_raw, str):
            raise InputError(f"waves must be text like '1,10%,50%,100%' or a list, got {waves_raw!r}")
        waves = parse_waves(waves_raw)
        soak_s = _duration("soak", body["soak"], parse_duration)
        deadline_raw = body.get("deadline")
        deadline_s = 86400.0 if deadline_raw is None else _duration("deadline", deadline_raw, parse_duration)
        gates = Gates.from_options(_gate_options(body.get("gates")))
        allow_bad = body.get("allow_bad", False)
        if not isinstance(allow_bad, bool):
            raise InputError(f"allow_bad must be true or false, got {allow_bad!r}")
        key = body.get("key")
        if key is None:
            trusted = list(self.trusted)
            if not trusted:
                raise InputError("key is required: the PEM text of the public key the bundle is signed with")
        elif isinstance(key, str):
            trusted = [TrustedKey.from_pem(key.encode(), source="the request's key")]
        else:
            raise InputError("key must be the PEM text of a public key, or null")
        # Verify first: nothing is copied, registered or offered for a bundle that does not verify.
        path = Path(bundle)
        if not path.exists() and not path.is_symlink():
            raise InputError(f"{path}: no such bundle file on the console's machine")
        verified = verify_bundle_file(path, trusted)
        m = verified.manifest
        if m.target != group["target"]:
            raise InputError(f"the bundle is for target {m.target!r}, the group is target {group['target']!r}")
        spec = keep_for_rollout(
            self.store,
            verified,
            self.bundles_dir,
            group=group,
            waves=waves,
            soak_s=soak_s,
            gates=gates,
            deadline_s=deadline_s,
            allow_bad=allow_bad,
        )
        return {"rollout": engine.start(spec)}


class _Pilot:
    """The autopilot and field-dataset endpoints."""

    def __init__(self, store: Store, autopilot: Autopilot | None) -> None:
        self.store, self.autopilot = store, autopilot

    def _pilot(self) -> Autopilot:
        if self.autopilot is None:
            raise ApiError(409, "this console runs without an autopilot")
        return self.autopilot

    def configs(self) -> dict[str, Any]:
        return {
            "autopilots": [
                {"group_key": r["group_key"], "config": r["config"], "updated_at": r["updated_at"]}
                for r in self.store.autopilots()
            ]
        }

    def configure(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object: the autopilot settings with a group")
        if "group" in body:
            body = {**body, "group": _group(body["group"])}
        return self._pilot().configure(body)

    def retrain(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or "group" not in body or set(body) - {"group", "reason"}:
            raise InputError('the request body must be {"group": {"target": ..., "tags": {...}}, "reason": text}')
        reason = body.get("reason") or "requested by an operator"
        if not isinstance(reason, str) or len(reason) > 200:
            raise InputError("reason must be text of at most 200 characters")
        return {"run": self._pilot().retrain(_group(body["group"]), trigger="manual", detail=reason)}

    def runs(self, request: Request) -> dict[str, Any]:
        limit = _query_int(request, "limit", 200, maximum=10_000)
        group = request.query_params.get("group") or None
        return {"runs": self.store.runs(group_key=group, limit=limit)}

    def run(self, run_id: str) -> dict[str, Any]:
        row = self.store.run(run_id)
        if row is None:
            raise ApiError(404, f"no autopilot run {run_id!r}")
        return {"run": row}

    def act(self, action: str) -> Callable[[Request], dict[str, Any]]:
        def handler(request: Request) -> dict[str, Any]:
            pilot, run_id = self._pilot(), request.path_params["run_id"]
            return {"run": pilot.approve(run_id) if action == "approve" else pilot.cancel(run_id)}

        return handler

    def samples(self, device_id: str) -> dict[str, Any]:
        row = self.store.device(check_device_id(device_id))
        if row is None:
            raise ApiError(404, f"no device {device_id!r} is known to this console")
        return {"device_id": device_id, "command_ids": self._pilot().request_samples([device_id])}

    def datasets(self) -> dict[str, Any]:
        return {"datasets": self.store.datasets()}

    def dataset(self, digest: str) -> dict[str, Any]:
        row = self.store.dataset(digest)
        if row is None:
            raise ApiError(404, f"no field dataset {digest!r} (or the prefix names more than one)")
        return {"dataset": row}

    def dataset_bytes(self, digest: str) -> tuple[bytes, str]:
        row = self.store.dataset(digest, with_data=True)
        if row is None:
            raise ApiError(404, f"no field dataset {digest!r} (or the prefix names more than one)")
        return bytes(row["data"]), row["digest"].removeprefix("sha256:") + ".npz"


def _group(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("target"), str) or not raw["target"]:
        raise InputError(f"group must be an object with a target (and optional tags), got {raw!r}")
    unknown = sorted(set(raw) - {"target", "tags"})
    if unknown:
        raise InputError(f"group has unknown fields {unknown}; expected target and tags")
    tags = raw.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in tags.items()):
        raise InputError(f"group.tags must be an object of text: text, got {tags!r}")
    return {"target": raw["target"], "tags": dict(sorted(tags.items()))}


def _gate_options(raw: object) -> dict[str, object]:
    """The request's ``gates`` object → options for :meth:`Gates.from_options` (numbers as they are)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"gates must be an object of name: value, got {raw!r}")
    options: dict[str, object] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InputError(f"gate {name} must be a number, got {value!r}")
        options[str(name)] = value
    return options


def _duration(name: str, raw: object, parse: Callable[[str], float]) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InputError(f"{name} must be a duration like 10m or a number of seconds, got {raw!r}")
    value = parse(str(raw))
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{name} must be a finite duration >= 0, got {raw!r}")
    return value


def _json_endpoint(handler: Callable[[Request], Any], *, status: int = 200) -> Callable[[Request], Awaitable[Response]]:
    """Run ``handler`` in the thread pool; its dict becomes JSON, its typed error a JSON error."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await run_in_threadpool(handler, request)
        except Exception as exc:  # noqa: BLE001 - mapped to a status; a bug re-raises in _status_of
            return _error(_status_of(exc), str(exc))
        return JSONResponse(result, status_code=status)

    return endpoint


def create_app(
    store: Store,
    engine: RolloutEngine | None,
    *,
    token: str | None,
    console_info: ConsoleInfo,
    bundles_dir: Path | None = None,
    trusted: Sequence[TrustedKey] = (),
    autopilot: Autopilot | None = None,
) -> Starlette:
    """The console's Starlette app: the JSON API under ``/api`` and the dashboard at ``/``.

    Args:
        store: the opened store.
        engine: the rollout engine (``None``: rollout endpoints answer 409).
        token: the API token, or ``None`` for an open console (loopback only; the caller checks).
        console_info: what ``/api/health`` reports about the console (a mapping, or a callable
            returning a fresh one per request).
        bundles_dir: where verified rollout bundles are copied.
        trusted: keys a rollout request without ``key`` is verified with.
        autopilot: the console's autopilot (``None``: its endpoints answer 409; datasets are still readable).
    """
    api = _Api(store, engine, console_info=console_info, bundles_dir=bundles_dir, trusted=trusted)
    pilot = _Pilot(store, autopilot)

    def with_body(handler: Callable[[Any], dict[str, Any]], status: int = 200) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                body = await _read_json(request)
                result = await run_in_threadpool(handler, body)
            except Exception as exc:  # noqa: BLE001 - mapped to a status; a bug re-raises in _status_of
                return _error(_status_of(exc), str(exc))
            return JSONResponse(result, status_code=status)

        return endpoint

    async def dataset_bytes(request: Request) -> Response:
        try:
            data, name = await run_in_threadpool(pilot.dataset_bytes, request.path_params["digest"])
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            return _error(_status_of(exc), str(exc))
        return Response(
            data, media_type="application/octet-stream", headers={"content-disposition": f'attachment; filename="{name}"'}
        )

    async def start_rollout(request: Request) -> Response:
        try:
            body = await _read_json(request)
            result = await run_in_threadpool(api.start, body)
        except Exception as exc:  # noqa: BLE001 - mapped to a status; a bug re-raises in _status_of
            return _error(_status_of(exc), str(exc))
        return JSONResponse(result, status_code=201)

    def act(action: str) -> Callable[[Request], Awaitable[Response]]:
        return _json_endpoint(lambda r: api.act(r.path_params["rollout_id"], action))

    async def not_found(request: Request) -> Response:
        return _error(404, f"no API route {request.method} {request.url.path}")

    routes: list[BaseRoute] = [
        Route("/api/health", _json_endpoint(lambda r: api.health()), methods=["GET"]),
        Route("/api/stats", _json_endpoint(lambda r: api.stats()), methods=["GET"]),
        Route("/api/devices", _json_endpoint(api.devices), methods=["GET"]),
        Route("/api/devices/{device_id}", _json_endpoint(lambda r: api.device(r.path_params["device_id"])), methods=["GET"]),
        Route(
            "/api/devices/{device_id}/history",
            _json_endpoint(lambda r: api.history(r.path_params["device_id"], r)),
            methods=["GET"],
        ),
        Route("/api/rejects", _json_endpoint(api.rejects), methods=["GET"]),
        Route("/api/rollouts", _json_endpoint(lambda r: api.rollouts()), methods=["GET"]),
        Route("/api/rollouts", start_rollout, methods=["POST"]),
        Route("/api/rollouts/{rollout_id}", _json_endpoint(lambda r: api.rollout(r.path_params["rollout_id"])), methods=["GET"]),
        *(Route(f"/api/rollouts/{{rollout_id}}/{a}", act(a), methods=["POST"]) for a in ("pause", "resume", "abort")),
        Route(
            "/api/devices/{device_id}/samples",
            _json_endpoint(lambda r: pilot.samples(r.path_params["device_id"])),
            methods=["POST"],
        ),
        Route("/api/datasets", _json_endpoint(lambda r: pilot.datasets()), methods=["GET"]),
        Route("/api/datasets/{digest}", _json_endpoint(lambda r: pilot.dataset(r.path_params["digest"])), methods=["GET"]),
        Route("/api/datasets/{digest}/data", dataset_bytes, methods=["GET"]),
        Route("/api/autopilot", _json_endpoint(lambda r: pilot.configs()), methods=["GET"]),
        Route("/api/autopilot", with_body(pilot.configure), methods=["PUT"]),
        Route("/api/autopilot/retrain", with_body(pilot.retrain, 201), methods=["POST"]),
        Route("/api/autopilot/runs", _json_endpoint(pilot.runs), methods=["GET"]),
        Route("/api/autopilot/runs/{run_id}", _json_endpoint(lambda r: pilot.run(r.path_params["run_id"])), methods=["GET"]),
        *(
            Route(f"/api/autopilot/runs/{{run_id}}/{a}", _json_endpoint(pilot.act(a)), methods=["POST"])
            for a in ("approve", "cancel")
        ),
        Route("/api/{rest:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
    try:
        from edgeops_fleet.dashboard import routes as dashboard_routes
    except ImportError:  # the API works without the pages
        pass
    else:
        routes.append(Mount("/", routes=dashboard_routes(store, engine)))

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "error")
        if request.url.path.startswith("/api/"):
            return _error(status, f"{request.method} {request.url.path}: {detail}")
        return Response(f"{status}: {detail}\n", status_code=status, media_type="text/plain")

    from starlette.exceptions import HTTPException

    app = Starlette(routes=routes, exception_handlers={HTTPException: method_not_allowed})
    if token is not None:
        app.add_middleware(_TokenGuard, token=token)
    return app
