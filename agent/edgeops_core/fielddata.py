"""Field datasets: labelled input rows collected from devices, addressed by content digest.

The fleet console merges the rows that devices upload into a :class:`FieldDataset` and
stores it under its :attr:`~FieldDataset.digest`; ``edgeops build --field-data`` trains on
it and ``edgeops evaluate`` measures a bundle on it. The file is an uncompressed ``.npz``
(``numpy.load`` reads it) holding exactly four arrays:

=================  ===========  =================================================
``x``              ``<f4``      ``[n, n_features]`` raw feature rows, all finite
``y``              ``<i8``      ``[n]`` label index, or :data:`UNLABELLED` (-1)
``device_index``   ``<i4``      ``[n]`` index into ``provenance.devices``
``meta``           ``|u1``      UTF-8 JSON ``{"format", "feature_names",
                                "label_names", "provenance", "digest"}``
=================  ===========  =================================================

Invariants, checked on construction and on every read:

* the digest is ``sha256:<hex>`` over a canonical encoding of the format name, the names,
  the provenance and the three arrays (see :attr:`FieldDataset.digest`), so it names the
  content, not the file: the zip container's timestamps do not enter it;
* a file is accepted only if every byte of it is accounted for: a zip local header at byte
  0, the members stored (uncompressed) back to back, the central directory right after the
  last one and the end-of-central-directory record as the last 22 bytes, so bytes appended,
  cut or slipped in between are refused; and only if the digest in ``meta`` equals the one
  recomputed from the arrays (and ``expect_digest``, when the caller gives one);
* whether a labelled row is held out (:meth:`FieldDataset.split`) depends on the row's
  feature bytes alone, so a row lands in the same split in every dataset that contains it
  and two overlapping datasets never leak a held-out row into training.

Only numpy and the standard library are used (this module is part of the device-safe
contract package); ``numpy.load`` always runs with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edgeops_core._json import load_untrusted_json
from edgeops_core.digest import sha256_new
from edgeops_core.errors import EdgeopsError, FieldDataError
from edgeops_core.fields import FieldReader
from edgeops_core.topics import check_device_id

__all__ = [
    "FIELD_FORMAT",
    "HOLDOUT_FRACTION",
    "MAX_FIELD_ROWS",
    "UNLABELLED",
    "FieldDataError",
    "FieldDataset",
    "Provenance",
    "load_field_dataset",
]

FIELD_FORMAT = "edgeops-field-dataset/1"
#: The label of a row nobody has labelled yet.
UNLABELLED = -1
#: Share of labelled rows held out for metrics (never trained on), decided per row.
HOLDOUT_FRACTION = 0.3
#: Largest dataset accepted, in rows.
MAX_FIELD_ROWS = 1_000_000

#: The arrays of the file, with the exact dtype and rank each must have.
_ARRAYS: Mapping[str, tuple[str, int]] = MappingProxyType(
    {"x": ("<f4", 2), "y": ("<i8", 1), "device_index": ("<i4", 1), "meta": ("|u1", 1)}
)
_META_KEYS = frozenset({"format", "feature_names", "label_names", "provenance", "digest"})
_PROVENANCE_KEYS = ("devices", "first_ts", "last_ts", "releases", "group", "uploads", "created")
#: Bytes of the meta JSON accepted at most (names and provenance, never rows).
_MAX_META_BYTES = 16 * 1024 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The message timestamp (utc_now_text) and the manifest timestamp (format_time) forms.
_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?Z")
_HOLDOUT_LIMIT = int(HOLDOUT_FRACTION * 2**32)
_EOCD = b"PK\x05\x06"
_LOCAL_HEADER = b"PK\x03\x04"


def _canonical(value: object) -> bytes:
    """JSON with sorted keys and no spaces: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _utc(value: object, path: str) -> datetime:
    if not isinstance(value, str) or not _UTC.fullmatch(value):
        raise FieldDataError(
            f"field dataset: field '{path}' must be UTC text like 2026-01-31T12:00:00.000000Z, got {value!r:.60}"
        )
    try:
        return datetime.strptime(value.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z" if "." in value else "%Y-%m-%dT%H:%M:%S%z")
    except ValueError as exc:
        raise FieldDataError(f"field dataset: field '{path}' is not a valid time: {value!r}") from exc


def _names(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise FieldDataError(f"field dataset: field '{path}' must be a non-empty list of non-empty strings")
    if len(set(value)) != len(value):
        dup = next(v for v in value if value.count(v) > 1)
        raise FieldDataError(f"field dataset: field '{path}' names {dup!r} more than once")
    return tuple(value)


@dataclass(frozen=True)
class Provenance:
    """Where the rows of a field dataset came from.

    Attributes:
        devices: ids of the devices that uploaded rows, sorted, each a valid device id.
        first_ts / last_ts: UTC text of the earliest and latest upload
            (``YYYY-MM-DDTHH:MM:SS.ffffffZ`` as messages carry it, or without the fraction).
        releases: the model releases that served the rows, sorted, each >= 1.
        group: the device group the rows were collected for
            (``{"target": "ecu", "tags": {"cohort": "b"}}``); ``{}`` if none. JSON data.
        uploads: how many device uploads were merged.
        created: UTC text of when the dataset was made.

    Raises:
        FieldDataError: on construction, naming the field that is invalid.
    """

    devices: tuple[str, ...]
    first_ts: str
    last_ts: str
    releases: tuple[int, ...]
    group: Mapping[str, Any]
    uploads: int
    created: str

    def __post_init__(self) -> None:
        if not isinstance(self.devices, (list, tuple)):
            raise FieldDataError("field dataset: field 'provenance.devices' must be a list of device ids")
        for i, device in enumerate(self.devices):
            try:
                check_device_id(device)
            except EdgeopsError as exc:
                raise FieldDataError(f"field dataset: field 'provenance.devices[{i}]': {exc}") from exc
        if list(self.devices) != sorted(set(self.devices)):
            raise FieldDataError("field dataset: field 'provenance.devices' must be sorted and without repeats")
        first, last = _utc(self.first_ts, "provenance.first_ts"), _utc(self.last_ts, "provenance.last_ts")
        if last < first:
            raise FieldDataError(f"field dataset: provenance.last_ts {self.last_ts} is before first_ts {self.first_ts}")
        _utc(self.created, "provenance.created")
        if not isinstance(self.releases, (list, tuple)) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.releases
        ):
            raise FieldDataError("field dataset: field 'provenance.releases' must be a list of release numbers >= 1")
        if list(self.releases) != sorted(set(self.releases)):
            raise FieldDataError("field dataset: field 'provenance.releases' must be sorted and without repeats")
        if isinstance(self.uploads, bool) or not isinstance(self.uploads, int) or self.uploads < 0:
            raise FieldDataError(f"field dataset: field 'provenance.uploads' must be an integer >= 0, got {self.uploads!r:.60}")
        if not isinstance(self.group, Mapping) or not all(isinstance(k, str) for k in self.group):
            raise FieldDataError("field dataset: field 'provenance.group' must be an object with string keys")
        try:
            # A deep, JSON-only copy: nothing the caller keeps can change it afterwards.
            group = load_untrusted_json(_canonical(dict(self.group)))
        except (TypeError, ValueError) as exc:
            raise FieldDataError(f"field dataset: field 'provenance.group' must be JSON data: {exc}") from exc
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "releases", tuple(self.releases))
        object.__setattr__(self, "group", MappingProxyType(group))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (the ``provenance`` object of the file's meta)."""
        return {
            "devices": list(self.devices),
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "releases": list(self.releases),
            "group": json.loads(_canonical(dict(self.group))),
            "uploads": self.uploads,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, raw: object) -> Provenance:
        """Parse :meth:`to_dict`'s form strictly: every field present, no other field.

        Raises:
            FieldDataError: a field is missing, unknown or invalid (the message names it).
        """
        r = FieldReader(FieldDataError, "field dataset")
        d = r.mapping(raw, "provenance")
        r.only(d, set(_PROVENANCE_KEYS), "provenance")
        releases = r.sequence(d, "releases", "provenance")
        return cls(
            devices=r.strings(d, "devices", "provenance"),
            first_ts=r.string(d, "first_ts", "provenance"),
            last_ts=r.string(d, "last_ts", "provenance"),
            releases=tuple(r.as_int(v, f"provenance.releases[{i}]", minimum=1) for i, v in enumerate(releases)),
            group=r.mapping(r.get(d, "group", "provenance"), "provenance.group"),
            uploads=r.integer(d, "uploads", "provenance", minimum=0),
            created=r.string(d, "created", "provenance"),
        )


def _frozen_array(value: object, path: str, dtype: str, *, integer: bool) -> np.ndarray:
    """``value`` as a read-only, C-ordered copy of ``dtype``; only numeric input converts."""
    arr = np.asarray(value)
    kinds = "iu" if integer else "fiu"
    if arr.dtype.kind not in kinds:
        expected = "integers" if integer else "numbers"
        raise FieldDataError(f"field dataset: field '{path}' must hold {expected}, got dtype {arr.dtype}")
    if integer and arr.size and arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.dtype(dtype)).max:
        raise FieldDataError(f"field dataset: field '{path}' has a value too large for {np.dtype(dtype).name}")
    if integer and arr.size and arr.dtype.kind == "i":
        info = np.iinfo(np.dtype(dtype))
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise FieldDataError(f"field dataset: field '{path}' has a value out of {np.dtype(dtype).name} range")
    with np.errstate(over="ignore", invalid="ignore"):  # a float64 beyond float32 becomes inf, refused below
        out = np.array(arr, dtype=np.dtype(dtype), order="C", copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class FieldDataset:
    """Field rows with their names and provenance; validated on construction.

    Two datasets are equal when their digests are.

    Attributes:
        feature_names / label_names: as in the manifest of the model the rows are for.
        x: float32 ``[n, len(feature_names)]``, finite (converted from any numeric dtype).
        y: int64 ``[n]``, :data:`UNLABELLED` or a label index.
        device_index: int32 ``[n]``, an index into ``provenance.devices``.
        provenance: where the rows came from.

    The arrays are read-only copies, so the digest, computed once, stays true.

    Raises:
        FieldDataError: on construction, naming the field that is invalid.
    """

    feature_names: tuple[str, ...]
    label_names: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    device_index: np.ndarray
    provenance: Provenance

    def __post_init__(self) -> None:
        features = _names(self.feature_names, "feature_names")
        labels = _names(self.label_names, "label_names")
        if not isinstance(self.provenance, Provenance):
            raise FieldDataError("field dataset: field 'provenance' must be a Provenance")
        x = _frozen_array(self.x, "x", "<f4", integer=False)
        y = _frozen_array(self.y, "y", "<i8", integer=True)
        idx = _frozen_array(self.device_index, "device_index", "<i4", integer=True)
        if x.ndim != 2 or x.shape[1] != len(features):
            raise FieldDataError(
                f"field dataset: field 'x' must have shape [rows, {len(features)}] (one column per feature name), "
                f"got {list(x.shape)}"
            )
        n = x.shape[0]
        if n > MAX_FIELD_ROWS:
            raise FieldDataError(f"field dataset: {n} rows, more than the {MAX_FIELD_ROWS} accepted")
        for name, arr in (("y", y), ("device_index", idx)):
            if arr.shape != (n,):
                raise FieldDataError(f"field dataset: field '{name}' must have shape [{n}] (one per row), got {list(arr.shape)}")
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise FieldDataError(
                f"field dataset: field 'x' has {int(bad.sum())} NaN/inf value(s); first at row {row}, feature {features[col]!r}"
            )
        wrong = (y != UNLABELLED) & ((y < 0) | (y >= len(labels)))
        if wrong.any():
            row = int(np.argmax(wrong))
            raise FieldDataError(
                f"field dataset: field 'y' row {row} is {int(y[row])}, not {UNLABELLED} (unlabelled) "
                f"or a label index in 0..{len(labels) - 1}"
            )
        outside = (idx < 0) | (idx >= len(self.provenance.devices))
        if outside.any():
            row = int(np.argmax(outside))
            raise FieldDataError(
                f"field dataset: field 'device_index' row {row} is {int(idx[row])}, not an index into "
                f"the {len(self.provenance.devices)} provenance.devices"
            )
        object.__setattr__(self, "feature_names", features)
        object.__setattr__(self, "label_names", labels)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "device_index", idx)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FieldDataset):
            return NotImplemented
        return self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    @cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` of the content.

        The hash runs over length-prefixed parts (an 8-byte little-endian length, then the
        bytes): :data:`FIELD_FORMAT`; the canonical JSON (sorted keys, no spaces, UTF-8) of
        ``feature_names``, of ``label_names`` and of ``provenance.to_dict()``; then for each
        of ``x``, ``y``, ``device_index`` the canonical JSON ``{"dtype", "name", "shape"}``
        followed by the array's little-endian, C-order bytes.
        """
        h = sha256_new()

        def part(data: bytes) -> None:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

        part(FIELD_FORMAT.encode("utf-8"))
        part(_canonical(list(self.feature_names)))
        part(_canonical(list(self.label_names)))
        part(_canonical(self.provenance.to_dict()))
        for name in ("x", "y", "device_index"):
            arr: np.ndarray = getattr(self, name)
            part(_canonical({"dtype": _ARRAYS[name][0], "name": name, "shape": list(arr.shape)}))
            part(arr.tobytes(order="C"))
        return f"sha256:{h.hexdigest()}"

    @property
    def rows(self) -> int:
        """Number of rows, labelled or not."""
        return int(self.x.shape[0])

    @property
    def labelled(self) -> int:
        """Number of labelled rows."""
        return int((self.y != UNLABELLED).sum())

    @property
    def labelled_fraction(self) -> float:
        """Share of rows that are labelled (0.0 for an empty dataset)."""
        return self.labelled / self.rows if self.rows else 0.0

    @cached_property
    def _held_out(self) -> np.ndarray:
        """Per row: whether it belongs to the held-out split (labelled or not)."""
        data = self.x.tobytes(order="C")
        width = 4 * self.x.shape[1]
        picks = [
            int.from_bytes(sha256_new(data[i : i + width]).digest()[:4], "big") < _HOLDOUT_LIMIT
            for i in range(0, len(data), width)
        ]
        return np.asarray(picks, dtype=bool).reshape(self.rows)

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """``(train_idx, holdout_idx)``: ascending int64 indices of the labelled rows.

        A labelled row is held out when the first 4 bytes of sha256 over its ``x`` bytes
        (float32, little-endian), read as a big-endian uint32, are below
        ``HOLDOUT_FRACTION * 2**32``. Unlabelled rows are in neither.
        """
        labelled = self.y != UNLABELLED
        held = self._held_out
        return np.flatnonzero(labelled & ~held).astype(np.int64), np.flatnonzero(labelled & held).astype(np.int64)

    def to_bytes(self) -> bytes:
        """The ``.npz`` file: four stored (uncompressed) ``.npy`` members, see the module docstring.

        The bytes depend on the content only (fixed member order and zip timestamps).
        """
        meta = {
            "format": FIELD_FORMAT,
            "feature_names": list(self.feature_names),
            "label_names": list(self.label_names),
            "provenance": self.provenance.to_dict(),
            "digest": self.digest,
        }
        arrays = {
            "x": self.x,
            "y": self.y,
            "device_index": self.device_index,
            "meta": np.frombuffer(_canonical(meta), dtype=np.uint8),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, arr, allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.create_system = 3  # the default depends on the platform writing it
                info.external_attr = 0o644 << 16
                zf.writestr(info, member.getvalue())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_digest: str | None = None) -> FieldDataset:
        """Parse and check a field dataset file's bytes.

        Args:
            data: the file's bytes.
            expect_digest: the digest the caller addressed it by; refused if it differs.

        Raises:
            FieldDataError: not an ``.npz``, bytes appended, cut or altered, missing or extra
                arrays, wrong dtypes or shapes, meta not JSON or of another format, a digest
                that does not match, too many rows, or any invalid field.
        """
        return _decode(bytes(data), expect_digest, "field dataset")


def load_field_dataset(path: Path, *, expect_digest: str | None = None) -> FieldDataset:
    """Read and check the field dataset file at ``path`` (see :meth:`FieldDataset.from_bytes`).

    Raises:
        FieldDataError: the file cannot be read, or is refused; the message names ``path``.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FieldDataError(f"{path}: cannot read field dataset: {exc.strerror or exc}") from exc
    return _decode(data, expect_digest, str(path))


def _decode(data: bytes, expect_digest: str | None, source: str) -> FieldDataset:
    if expect_digest is not None and not (isinstance(expect_digest, str) and _DIGEST.fullmatch(expect_digest)):
        raise FieldDataError(f"{source}: expected digest must be 'sha256:' and 64 hex digits, got {expect_digest!r:.80}")
    arrays = _read_arrays(data, source)
    meta = _meta(arrays["meta"], source)
    try:
        dataset = FieldDataset(
            feature_names=_names(meta["feature_names"], "feature_names"),
            label_names=_names(meta["label_names"], "label_names"),
            x=arrays["x"],
            y=arrays["y"],
            device_index=arrays["device_index"],
            provenance=Provenance.from_dict(meta["provenance"]),
        )
    except FieldDataError as exc:
        raise FieldDataError(f"{source}: {str(exc).removeprefix('field dataset: ')}") from exc
    if dataset.digest != meta["digest"]:
        raise FieldDataError(
            f"{source}: the content's digest is {dataset.digest}, but the file says {meta['digest']}: the file was altered"
        )
    if expect_digest is not None and dataset.digest != expect_digest:
        raise FieldDataError(f"{source}: digest is {dataset.digest}, expected {expect_digest}")
    return dataset


def _meta(raw: np.ndarray, source: str) -> dict[str, Any]:
    try:
        meta = load_untrusted_json(raw.tobytes())
    except ValueError as exc:  # also UnicodeDecodeError
        raise FieldDataError(f"{source}: meta is not UTF-8 JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise FieldDataError(f"{source}: meta must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FIELD_FORMAT:
        raise FieldDataError(f"{source}: meta.format is {meta.get('format')!r:.60}, expected {FIELD_FORMAT!r}")
    if set(meta) != _META_KEYS:
        missing, extra = sorted(_META_KEYS - set(meta)), sorted(set(meta) - _META_KEYS)
        raise FieldDataError(
            f"{source}: meta must have exactly {', '.join(sorted(_META_KEYS))}; missing {missing}, extra {extra}"
        )
    if not isinstance(meta["digest"], str) or not _DIGEST.fullmatch(meta["digest"]):
        raise FieldDataError(f"{source}: meta.digest must be 'sha256:' and 64 hex digits, got {meta['digest']!r:.80}")
    return meta


def _read_arrays(data: bytes, source: str) -> dict[str, np.ndarray]:
    """The four arrays, after checking that the container holds them and nothing else."""

    if not data.startswith(_LOCAL_HEADER):
        raise FieldDataError(f"{source}: not an .npz file (no zip member at byte 0)")
    # The end-of-central-directory record, without a comment, is the file's last 22 bytes:
    # otherwise bytes were appended (zipfile would read past them) or the file was cut.
    if len(data) < 22 or data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
        raise FieldDataError(f"{source}: the .npz does not end with its end-of-archive record: bytes were appended or cut")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            _check_members(data, infos, zf.start_dir, source)
            headers = {info.filename.removesuffix(".npy"): _npy_header(zf, info, source) for info in infos}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as exc:
        raise FieldDataError(f"{source}: not a readable .npz file: {exc}") from exc
    rows = headers["x"][0][0] if len(headers["x"][0]) == 2 else 0
    if rows > MAX_FIELD_ROWS:
        raise FieldDataError(f"{source}: {rows} rows, more than the {MAX_FIELD_ROWS} accepted")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for name in _ARRAYS:
                arrays[name] = np.asarray(npz[name])
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise FieldDataError(f"{source}: cannot read the arrays: {exc}") from exc
    return arrays


def _check_members(data: bytes, infos: list[zipfile.ZipInfo], start_dir: int, source: str) -> None:

    names = [info.filename for info in infos]
    expected = {f"{name}.npy" for name in _ARRAYS}
    if sorted(names) != sorted(expected):
        missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise FieldDataError(
            f"{source}: the .npz must hold exactly {', '.join(sorted(expected))}; "
            f"missing {missing}, extra {extra}" + (f", repeated {repeated}" if repeated else "")
        )
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x9:
            raise FieldDataError(f"{source}: member {info.filename} must be stored uncompressed and unencrypted")
        if info.header_offset != end:
            raise FieldDataError(f"{source}: {abs(info.header_offset - end)} unaccounted byte(s) before member {info.filename}")
        if data[end : end + 4] != _LOCAL_HEADER:
            raise FieldDataError(f"{source}: member {info.filename} has no zip header at byte {end}")
        name_len, extra_len = struct.unpack_from("<HH", data, end + 26)
        end += 30 + name_len + extra_len + info.compress_size
    if end != start_dir:
        raise FieldDataError(f"{source}: {abs(start_dir - end)} unaccounted byte(s) before the zip central directory")


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of a member from its ``.npy`` header, checked before anything is allocated."""
    name = info.filename.removesuffix(".npy")
    dtype_text, rank = _ARRAYS[name]
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise FieldDataError(f"{source}: array {name!r} has .npy format version {version}, expected 1.0 or 2.0")
        header_bytes = fh.tell()
    if dtype.hasobject or dtype != np.dtype(dtype_text):
        raise FieldDataError(f"{source}: array {name!r} must have dtype {dtype_text}, got {dtype.str}")
    if len(shape) != rank:
        raise FieldDataError(f"{source}: array {name!r} must have {rank} dimension(s), got shape {list(shape)}")
    count = math.prod(shape)  # Python integers: a crafted shape cannot overflow
    if name == "meta" and count > _MAX_META_BYTES:
        raise FieldDataError(f"{source}: meta is {count} bytes, more than {_MAX_META_BYTES}")
    if header_bytes + count * dtype.itemsize != info.file_size:
        raise FieldDataError(
            f"{source}: array {name!r} of shape {list(shape)} needs {count * dtype.itemsize} bytes of data, "
            f"the member holds {info.file_size - header_bytes}"
        )
    return tuple(shape), dtype.str
