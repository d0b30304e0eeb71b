"""IMOD binary models (``.mod``): read, write, rasterise, and convert to/from vesicle tables.

No IMOD installation is needed: the big-endian chunked "V1.2" format is read and written here.

File layout (all numbers big-endian)::

    "IMOD" "V1.2"  model header (232 bytes: name, xmax/ymax/zmax, flags, scale, pixel size, units)
    per object:   "OBJT" + 176 bytes (name, contour count, flags, colour, sphere size, ...)
                  per contour: "CONT" + psize/flags/time/surf (16 bytes) + psize * (x, y, z) float32
                               optional "SIZE" + nbytes + psize float32 radii (pixels)
                  optional "MESH" + vsize/lsize/flag/time/surf (16 bytes) + vertices + indices
                  optional sized chunks ("IMAT", "OLBL", "LABL", "CLIP", "MEPA", "OBST", "COST", ...)
    optional model-level sized chunks ("VIEW", "MINX", "SLAN", "MOST", ...)
    "IEOF"

``OBJT``, ``CONT`` and ``MESH`` have no size field; every other chunk is ``id, int32 nbytes, data``
and is skipped by its size (meshes and materials are dropped: 3dmod recomputes meshes). Object
flag bit 3 (8) = open contours, bit 9 (512) = scattered points (IMOD sets both for scattered
objects); neither = closed contours. Contour flag bit 3 marks a single open contour.

Coordinate convention
---------------------
IMOD model points are (x, y, z) in pixels of the image the model was drawn on. In X and Y the
coordinate runs over pixel *edges*: 0 is the left/bottom edge of the first pixel and the centre of
pixel ``i`` is at ``i + 0.5`` (x spans 0..NX). In Z a point with an integer coordinate ``k`` lies
on section ``k`` (its centre), so z spans -0.5..NZ-0.5. Our arrays are (z, y, x) with voxel centres
at integer indices, hence::

    imod (x, y, z) = (x_index + 0.5, y_index + 0.5, z_index)
    voxel index    = (z, y - 0.5, x - 0.5)          (z section of a point = floor(z + 0.5))

A pixel is inside a closed contour when its *centre* is inside the polygon; a tube pixel is
painted when its centre lies within ``diameter / 2`` of the polyline. Point sizes (``SIZE``) and
the object sphere size are radii in X/Y pixels. The header pixel size is ``pixel_size`` in
``units`` (IMOD unit codes: 0 pixels, -9 nm, -10 Å, -6 µm, ...). Models saved on a sub-volume
(non-zero MINX ``ctrans``) are not shifted here: use them with the volume they were drawn on.
Models saved on a Y/Z-flipped view (model flag bit 16) are flipped back on reading (y <-> z).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoves.atomic import atomic_path
from cryoves.errors import FormatError, InputError, VoxelSizeError
from cryoves.io.tomogram import validate_voxel_size
from cryoves.vesicles import VesicleTable

log = logging.getLogger(__name__)

# Object flags (bit numbers as in IMOD's binary format description).
OBJ_OFF = 1 << 1
OBJ_OPEN = 1 << 3
OBJ_OUT = 1 << 5
OBJ_FILL = 1 << 8
OBJ_SCATTERED = 1 << 9
# Contour flag: this contour is open (inside an object of closed contours).
CONT_OPEN = 1 << 3
# Model flag: z runs from -0.5 (integer z = section centre), the convention written here.
MODEL_Z_FROM_MINUS_HALF = 1 << 10
MODEL_NEW_TO_3DMOD = 1 << 11
# Model flag: points are stored with y and z exchanged (model last saved on a Y/Z-flipped view).
MODEL_FLIPPED_YZ = 1 << 16

#: IMOD unit code -> (name, metres per unit). 0 means "pixels" (no physical size).
UNITS: dict[int, tuple[str, float]] = {
    0: ("pixels", float("nan")),
    3: ("km", 1e3),
    1: ("m", 1.0),
    -2: ("cm", 1e-2),
    -3: ("mm", 1e-3),
    -6: ("um", 1e-6),
    -9: ("nm", 1e-9),
    -10: ("A", 1e-10),
    -12: ("pm", 1e-12),
}
UNIT_NM = -9

_HEADER = struct.Struct(">128s4iI4i6f5ifii3f")  # 232 bytes
_OBJECT = struct.Struct(">64s16iiIii3fi8Bii")  # 176 bytes
_CONTOUR = struct.Struct(">iIii")  # 16 bytes
_MESH = struct.Struct(">iiIhh")  # 16 bytes
_INT = struct.Struct(">i")
assert _HEADER.size == 232 and _OBJECT.size == 176

# Default object display bytes: symbol, symsize, linewidth2, linewidth, linesty, symflags, sympad, trans
_DEFAULT_SYMBOL_BYTES = (0, 3, 1, 1, 0, 0, 0, 0)
#: Largest |coordinate| (pixels) the reader accepts in a contour point.
MAX_COORDINATE = 1e7


# ----------------------------------------------------------------------------------- data model
@dataclass(eq=False)
class ImodContour:
    """One contour: ``points`` (N, 3) in IMOD (x, y, z) pixel coordinates (see module docstring).

    ``sizes`` (N,) are per-point radii in pixels (``SIZE`` chunk) or None; a negative size means
    "use the object's sphere size", as in IMOD.
    """

    points: np.ndarray
    sizes: np.ndarray | None = None
    flags: int = 0
    time: int = 0
    surf: int = 0

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 3)
        if self.sizes is not None:
            self.sizes = np.asarray(self.sizes, dtype=np.float64).reshape(-1)

    @property
    def open(self) -> bool:
        """True when this single contour is flagged open (within a closed-contour object)."""
        return bool(self.flags & CONT_OPEN)

    @property
    def section(self) -> int:
        """Z section (index) of the contour's first point: ``floor(z + 0.5)``."""
        return int(math.floor(self.points[0, 2] + 0.5))


@dataclass(eq=False)
class ImodObject:
    """One IMOD object: a named, coloured list of contours of one kind (closed/open/scattered).

    ``sphere_size`` is the default point radius in pixels (IMOD ``pdrawsize``), used for points
    without a per-point size. ``colour`` is (r, g, b) in 0..1.
    """

    name: str = ""
    flags: int = 0
    colour: tuple[float, float, float] = (0.0, 1.0, 0.0)
    sphere_size: int = 0
    contours: list[ImodContour] = field(default_factory=list)
    axis: int = 0
    drawmode: int = 1
    symbol_bytes: tuple[int, ...] = _DEFAULT_SYMBOL_BYTES
    extra: tuple[int, ...] = (0,) * 16
    surfsize: int = 0
    imat: bytes | None = None  # material chunk, kept verbatim for round trips

    @classmethod
    def of_kind(cls, kind: str, name: str = "", **kwargs: Any) -> ImodObject:
        """Make an object of ``kind`` "closed", "open" or "scattered" with the right flags."""
        flags = {"closed": 0, "open": OBJ_OPEN, "scattered": OBJ_SCATTERED | OBJ_OPEN}.get(kind)
        if flags is None:
            raise InputError(f"unknown IMOD object kind {kind!r}; use 'closed', 'open' or 'scattered'")
        return cls(name=name, flags=flags | int(kwargs.pop("flags", 0)), **kwargs)

    @property
    def scattered(self) -> bool:
        return bool(self.flags & OBJ_SCATTERED)

    @property
    def open(self) -> bool:
        """Open contours (lines), not scattered points."""
        return bool(self.flags & OBJ_OPEN) and not self.scattered

    @property
    def closed(self) -> bool:
        return not (self.flags & (OBJ_OPEN | OBJ_SCATTERED))

    @property
    def kind(self) -> str:
        return "scattered" if self.scattered else "open" if self.open else "closed"


@dataclass(eq=False)
class ImodModel:
    """An IMOD model: header values plus objects.

    ``xmax, ymax, zmax`` are the image size (x, y, z) the model was drawn on; ``pixel_size`` is in
    ``units`` (IMOD unit code, 0 = pixels, -9 = nm); ``scale`` is the (x, y, z) display scale
    (z = section thickness / pixel size).
    """

    objects: list[ImodObject] = field(default_factory=list)
    xmax: int = 0
    ymax: int = 0
    zmax: int = 0
    pixel_size: float = 1.0
    units: int = 0
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str = ""
    flags: int = MODEL_Z_FROM_MINUS_HALF | MODEL_NEW_TO_3DMOD

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image size as (z, y, x)."""
        return (self.zmax, self.ymax, self.xmax)

    @property
    def units_name(self) -> str:
        return UNITS.get(self.units, (f"unknown unit code {self.units}", float("nan")))[0]

    @property
    def pixel_size_angstrom(self) -> float | None:
        """Header pixel size in Å, or None when the model is in pixels or the unit is unknown."""
        metres = UNITS.get(self.units, ("", float("nan")))[1]
        value = self.pixel_size * metres * 1e10
        # the header stores float32: drop the float32 noise (2.2 nm -> 22.0000005 Å)
        return float(f"{value:.6g}") if math.isfinite(value) and value > 0 else None


# ----------------------------------------------------------------------------------- reading
class _Reader:
    """Cursor over the file bytes; every read checks the remaining size first (bounded memory)."""

    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def fail(self, what: str) -> FormatError:
        return FormatError(
            f"{self.source} is not a valid IMOD model: {what} (byte {self.pos}); export the model again from 3dmod"
        )

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining:
            raise self.fail(f"truncated {what} (needs {n} bytes, {self.remaining} left)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def floats(self, count: int, what: str) -> np.ndarray:
        raw = self.take(4 * count, what)
        with np.errstate(invalid="ignore"):  # signalling NaNs warn on the cast; refused just below
            arr = np.frombuffer(raw, dtype=">f4").astype(np.float64)
        if not np.isfinite(arr).all():
            raise self.fail(f"non-finite value in {what}")
        return arr


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def read_mod(path: str | Path) -> ImodModel:
    """Read an IMOD binary model file.

    Raises :class:`InputError` when the file is missing and :class:`FormatError` for anything that
    is not a complete, well-formed V1.2 model (any byte string gives a model or a FormatError).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"IMOD model not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_mod(data, source=str(path))


def parse_mod(data: bytes, source: str = "<bytes>") -> ImodModel:
    """Parse the bytes of an IMOD binary model (see :func:`read_mod`)."""
    if not data:
        raise FormatError(f"{source} is empty, not an IMOD model; export the model again from 3dmod")
    if data[:4].lower() == b"imod" and data[:4] != b"IMOD":
        raise FormatError(
            f"{source} is an ASCII IMOD model; open it in 3dmod and save it to get a binary .mod"
        )
    if data[:4] != b"IMOD":
        raise FormatError(f"{source} is not an IMOD model (does not start with 'IMOD')")
    try:
        return _parse(_Reader(data, source))
    except FormatError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError) as exc:  # safety net
        raise FormatError(f"{source} is not a valid IMOD model: {exc}; export the model again from 3dmod") from exc


def _parse(rd: _Reader) -> ImodModel:
    model, objsize = _read_header(rd)
    declared: list[int] = []
    obj: ImodObject | None = None
    cont: ImodContour | None = None
    while True:
        if rd.remaining < 4:
            raise rd.fail("truncated (no IEOF end marker)")
        cid = rd.take(4, "chunk id")
        if cid == b"IEOF":
            break
        if cid == b"OBJT":
            obj, n = _read_object(rd)
            model.objects.append(obj)
            declared.append(n)
            cont = None
        elif cid == b"CONT":
            if obj is None:
                raise rd.fail("contour before any object")
            cont = _read_contour(rd)
            obj.contours.append(cont)
        elif cid == b"MESH":
            if obj is None:
                raise rd.fail("mesh before any object")
            _skip_mesh(rd)
        else:
            (size,) = rd.unpack(_INT, f"size of chunk {cid!r}")
            if size < 0 or size > rd.remaining:
                raise rd.fail(f"chunk {cid!r} size {size} does not fit the file size")
            body = rd.take(size, f"chunk {cid!r}")
            if cid == b"SIZE":
                _attach_sizes(rd, cont, body)
            elif cid == b"IMAT" and obj is not None:
                obj.imat = body
    _finish(rd, model, objsize, declared)
    return model


def _read_header(rd: _Reader) -> tuple[ImodModel, int]:
    rd.take(4, "file id")
    version = rd.take(4, "version")
    if version != b"V1.2":
        raise rd.fail(f"unsupported version {version!r} (only V1.2 models are read)")
    h = rd.unpack(_HEADER, "model header")
    name, xmax, ymax, zmax, objsize, flags = h[0:6]
    if objsize < 0 or objsize > rd.remaining // (4 + _OBJECT.size):
        raise rd.fail(f"object count {objsize} does not fit the file size")
    model = ImodModel(
        objects=[], xmax=xmax, ymax=ymax, zmax=zmax, pixel_size=float(h[21]), units=h[22],
        scale=tuple(float(v) for v in h[13:16]), offset=tuple(float(v) for v in h[10:13]),
        name=_cstring(name), flags=flags,
    )
    return model, objsize


def _read_object(rd: _Reader) -> tuple[ImodObject, int]:
    o = rd.unpack(_OBJECT, "object header")
    obj = ImodObject(
        name=_cstring(o[0]), extra=tuple(o[1:17]), flags=o[18], axis=o[19], drawmode=o[20],
        colour=(float(o[21]), float(o[22]), float(o[23])), sphere_size=o[24],
        symbol_bytes=tuple(o[25:33]), surfsize=o[34],
    )
    return obj, o[17]


def _read_contour(rd: _Reader) -> ImodContour:
    psize, cflags, time, surf = rd.unpack(_CONTOUR, "contour header")
    if psize < 0 or 12 * psize > rd.remaining:
        raise rd.fail(f"contour point count {psize} does not fit the file size")
    pts = rd.floats(3 * psize, "contour points").reshape(-1, 3)
    if pts.size and np.abs(pts).max() > MAX_COORDINATE:
        # no image is 10^7 pixels wide: such values are corruption, and overflow pixel indices
        raise rd.fail(f"contour point coordinate {np.abs(pts).max():.3g} is out of range (> {MAX_COORDINATE:g} px)")
    return ImodContour(points=pts, flags=cflags, time=time, surf=surf)


def _skip_mesh(rd: _Reader) -> None:
    vsize, lsize = rd.unpack(_MESH, "mesh header")[:2]
    if vsize < 0 or lsize < 0 or 12 * vsize + 4 * lsize > rd.remaining:
        raise rd.fail(f"mesh sizes {vsize}/{lsize} do not fit the file size")
    rd.take(12 * vsize + 4 * lsize, "mesh data")


def _attach_sizes(rd: _Reader, cont: ImodContour | None, body: bytes) -> None:
    if cont is None:
        raise rd.fail("SIZE chunk without a contour")
    if len(body) != 4 * len(cont.points):
        raise rd.fail(f"SIZE chunk of {len(body)} bytes for a contour of {len(cont.points)} points")
    sizes = np.frombuffer(body, dtype=">f4").astype(np.float64)
    if not np.isfinite(sizes).all():
        raise rd.fail("non-finite point size")
    cont.sizes = sizes


def _finish(rd: _Reader, model: ImodModel, objsize: int, declared: list[int]) -> None:
    if model.flags & MODEL_FLIPPED_YZ:
        # undo the flip as IMOD's own readers do: exchange y and z (and the image sizes)
        for o in model.objects:
            for c in o.contours:
                c.points = c.points[:, [0, 2, 1]]
        model.ymax, model.zmax = model.zmax, model.ymax
        model.flags &= ~MODEL_FLIPPED_YZ
        log.info("%s was saved on a Y/Z-flipped view; y and z exchanged back", rd.source)
    for k, (o, n) in enumerate(zip(model.objects, declared), start=1):
        if n != len(o.contours):
            log.warning("%s: object %d declares %d contours but holds %d", rd.source, k, n, len(o.contours))
    if objsize != len(model.objects):
        log.warning("%s: header declares %d objects but the file holds %d", rd.source, objsize, len(model.objects))


# ----------------------------------------------------------------------------------- writing
def _encode_name(name: str, size: int) -> bytes:
    raw = name.encode("utf-8")[: size - 1]
    return raw + b"\0" * (size - len(raw))


def _check_int32(value: int, what: str) -> int:
    value = int(value)
    if not -(2**31) <= value < 2**31:
        raise InputError(f"IMOD model {what} {value} does not fit a 32-bit integer")
    return value


def model_to_bytes(model: ImodModel) -> bytes:
    """Serialise ``model`` to IMOD V1.2 binary bytes (validates points and sizes first)."""
    try:
        return _to_bytes(model)
    except struct.error as exc:
        raise InputError(f"IMOD model cannot be written: a header value is out of range ({exc})") from exc


def _to_bytes(model: ImodModel) -> bytes:
    parts: list[bytes] = [b"IMOD", b"V1.2"]
    parts.append(_HEADER.pack(
        _encode_name(model.name, 128),
        _check_int32(model.xmax, "xmax"), _check_int32(model.ymax, "ymax"),
        _check_int32(model.zmax, "zmax"), len(model.objects), int(model.flags) & 0xFFFFFFFF,
        1, 1, 0, 255,  # drawmode, mousemode, black level, white level
        *(float(v) for v in model.offset), *(float(v) for v in model.scale),
        -1, -1, -1, 3, 128,  # current object/contour/point, resolution, threshold
        float(model.pixel_size), int(model.units), 0, 0.0, 0.0, 0.0,
    ))
    for k, obj in enumerate(model.objects, start=1):
        if len(obj.extra) != 16 or len(obj.symbol_bytes) != 8:
            raise InputError(f"IMOD object {k}: extra must hold 16 ints and symbol_bytes 8 bytes")
        parts.append(b"OBJT")
        parts.append(_OBJECT.pack(
            _encode_name(obj.name, 64), *(int(v) for v in obj.extra), len(obj.contours),
            int(obj.flags) & 0xFFFFFFFF, int(obj.axis), int(obj.drawmode),
            *(float(c) for c in obj.colour), _check_int32(obj.sphere_size, "sphere size"),
            *(int(b) & 0xFF for b in obj.symbol_bytes), 0, int(obj.surfsize),
        ))
        for c, cont in enumerate(obj.contours, start=1):
            pts = np.asarray(cont.points, dtype=np.float64).reshape(-1, 3)
            if not np.isfinite(pts).all():
                raise InputError(f"IMOD object {k} contour {c} has non-finite coordinates")
            parts.append(b"CONT")
            parts.append(_CONTOUR.pack(len(pts), int(cont.flags) & 0xFFFFFFFF, int(cont.time), int(cont.surf)))
            parts.append(pts.astype(">f4").tobytes())
            if cont.sizes is not None:
                sizes = np.asarray(cont.sizes, dtype=np.float64).reshape(-1)
                if len(sizes) != len(pts) or not np.isfinite(sizes).all():
                    raise InputError(
                        f"IMOD object {k} contour {c}: sizes must be {len(pts)} finite values"
                    )
                parts += [b"SIZE", _INT.pack(4 * len(sizes)), sizes.astype(">f4").tobytes()]
        if obj.imat is not None:
            parts += [b"IMAT", _INT.pack(len(obj.imat)), bytes(obj.imat)]
    parts.append(b"IEOF")
    return b"".join(parts)


def write_mod(path: str | Path, model: ImodModel) -> Path:
    """Write ``model`` as an IMOD binary model, atomically (overwrites ``path``)."""
    data = model_to_bytes(model)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# ----------------------------------------------------------------------------------- rasterising
def _select(model: ImodModel, kind: str, objects: Iterable[int | str] | None) -> list[ImodObject]:
    """Objects of ``kind``; ``objects`` picks by 1-based IMOD object number or by name.

    An explicit selection is used as given, whatever the objects' kind (e.g. fill an open object).
    """
    if objects is None:
        return [o for o in model.objects if o.kind == kind]
    chosen = []
    for sel in objects:
        if isinstance(sel, str):
            hits = [o for o in model.objects if o.name == sel]
            if not hits:
                raise InputError(f"IMOD model has no object named {sel!r}")
            chosen.extend(hits)
        else:
            if not 1 <= int(sel) <= len(model.objects):
                raise InputError(
                    f"IMOD object {sel} does not exist (model has {len(model.objects)} objects, numbered from 1)"
                )
            chosen.append(model.objects[int(sel) - 1])
    return chosen


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise InputError(f"mask shape must be three positive sizes (z, y, x), got {shape}")
    return shape  # type: ignore[return-value]


def _polygon_mask(xy: np.ndarray, ny: int, nx: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Pixels of an (ny, nx) section whose centres lie inside polygon ``xy`` (IMOD x, y).

    Scanline even-odd rule, vectorised: each edge crossing of a row (at the pixel-centre height)
    toggles every pixel whose centre lies to its right; the parity of the toggles is the fill.
    """
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    row_lo = max(int(math.ceil(y0.min() - 0.5)), 0)
    row_hi = min(int(math.floor(y0.max() - 0.5)), ny - 1)
    col_lo = max(int(math.floor(x0.min())), 0)
    col_hi = min(int(math.ceil(x0.max())), nx)
    if row_hi < row_lo or col_hi <= col_lo:
        return None
    yc = np.arange(row_lo, row_hi + 1) + 0.5
    # half-open rule (lower end in, upper end out) so a vertex on a row is counted once
    cross = ((y0[:, None] <= yc) & (yc < y1[:, None])) | ((y1[:, None] <= yc) & (yc < y0[:, None]))
    e, r = np.nonzero(cross)
    xc = x0[e] + (yc[r] - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
    start = np.clip(np.floor(xc - 0.5).astype(np.int64) + 1 - col_lo, 0, col_hi - col_lo)
    toggles = np.zeros((len(yc), col_hi - col_lo + 1), dtype=np.int32)
    np.add.at(toggles, (r, start), 1)
    inside = (np.cumsum(toggles, axis=1)[:, :-1] % 2).astype(bool)
    return (slice(row_lo, row_hi + 1), slice(col_lo, col_hi)), inside


def _nesting_levels(polys: list[np.ndarray]) -> list[int]:
    """1 + number of other contours that contain most of this contour's points."""
    from matplotlib.path import Path as MplPath

    paths = [MplPath(p) for p in polys]
    levels = []
    for i, p in enumerate(polys):
        outer = sum(1 for j, q in enumerate(paths) if j != i and q.contains_points(p).mean() > 0.5)
        levels.append(1 + outer)
    return levels


def rasterize_closed(
    model: ImodModel, shape: Sequence[int], objects: Iterable[int | str] | None = None
) -> np.ndarray:
    """Fill closed contours section by section into a bool mask of ``shape`` (z, y, x).

    Each contour lies in section ``floor(z0 + 0.5)`` of its first point. Within a section, nesting
    decides: a contour inside an odd number of others is a hole (painted empty), otherwise filled —
    outer outline, hole, island, ... Sections without a contour stay empty (no interpolation).
    ``objects`` (1-based numbers or names) defaults to all closed-contour objects.
    """
    nz, ny, nx = _check_shape(shape)
    mask = np.zeros((nz, ny, nx), dtype=bool)
    by_section: dict[int, list[np.ndarray]] = {}
    for obj in _select(model, "closed", objects):
        for cont in obj.contours:
            if len(cont.points) >= 3:
                by_section.setdefault(cont.section, []).append(cont.points[:, :2])
    for z, polys in by_section.items():
        if not 0 <= z < nz:
            continue
        levels = _nesting_levels(polys) if len(polys) > 1 else [1]
        for level in sorted(set(levels)):
            for poly, lev in zip(polys, levels):
                if lev != level:
                    continue
                hit = _polygon_mask(poly, ny, nx)
                if hit is None:
                    continue
                (sy, sx), inside = hit
                mask[z, sy, sx][inside] = level % 2 == 1
    return mask


def _segment_tube(mask2d: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> None:
    """Paint pixels whose centres are within ``radius`` of segment a-b (IMOD x, y)."""
    ny, nx = mask2d.shape
    lo = np.maximum(np.floor(np.minimum(a, b) - radius - 1).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(a, b) + radius + 1).astype(int), (nx, ny))
    if np.any(hi <= lo):
        return
    px = np.arange(lo[0], hi[0]) + 0.5
    py = np.arange(lo[1], hi[1]) + 0.5
    d = b - a
    len2 = float(d @ d)
    rx = px[None, :] - a[0]
    ry = py[:, None] - a[1]
    t = np.clip((rx * d[0] + ry * d[1]) / len2, 0.0, 1.0) if len2 > 0 else np.zeros((len(py), len(px)))
    dist2 = (rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2
    mask2d[lo[1] : hi[1], lo[0] : hi[0]] |= dist2 <= radius * radius


def rasterize_open(
    model: ImodModel,
    shape: Sequence[int],
    objects: Iterable[int | str] | None = None,
    diameter: float = 3.0,
) -> np.ndarray:
    """Draw open contours as in-plane tubes of ``diameter`` pixels into a bool mask (z, y, x).

    Each segment is painted (2-D distance to the pixel centre ≤ diameter / 2) in every section from
    ``floor(z + 0.5)`` of one end to the other; for planar contours that is the contour's own
    section. A single-point contour paints a disc. ``objects`` defaults to all open-contour objects.
    """
    nz, ny, nx = _check_shape(shape)
    if not diameter > 0:
        raise InputError(f"tube diameter must be positive, got {diameter}")
    radius = diameter / 2.0
    mask = np.zeros((nz, ny, nx), dtype=bool)
    for obj in _select(model, "open", objects):
        for cont in obj.contours:
            pts = cont.points
            if len(pts) == 0:
                continue
            segs = [(pts[0], pts[0])] if len(pts) == 1 else list(zip(pts[:-1], pts[1:]))
            for a, b in segs:
                za, zb = (int(math.floor(v + 0.5)) for v in (a[2], b[2]))
                for z in range(max(min(za, zb), 0), min(max(za, zb), nz - 1) + 1):
                    _segment_tube(mask[z], a[:2], b[:2], radius)
    return mask


def _points_inside(model_objects: list[ImodObject], shape: tuple[int, int, int]) -> tuple[int, int]:
    """(number of contours, number with at least one point inside the volume)."""
    nz, ny, nx = shape
    total = inside = 0
    for obj in model_objects:
        for cont in obj.contours:
            if len(cont.points) == 0:
                continue
            total += 1
            p = cont.points
            zs = np.floor(p[:, 2] + 0.5)
            ok = (p[:, 0] >= 0) & (p[:, 0] <= nx) & (p[:, 1] >= 0) & (p[:, 1] <= ny) & (zs >= 0) & (zs < nz)
            inside += bool(ok.any())
    return total, inside


def mask_from_mod(
    path: str | Path,
    shape: Sequence[int],
    kind: str = "closed",
    objects: Iterable[int | str] | None = None,
    diameter: float = 3.0,
) -> np.ndarray:
    """Read ``path`` and rasterise it into a bool mask of ``shape`` (z, y, x).

    ``kind="closed"``: filled closed contours (cell outline → cytoplasm mask);
    ``kind="open"``: tubes of ``diameter`` pixels (active zone). Raises :class:`InputError` when
    the model has no contours of that kind or all of them lie outside the volume (model drawn on
    another, e.g. binned, volume?), and when the resulting mask is empty.
    """
    if kind not in ("closed", "open"):
        raise InputError(f"mask kind must be 'closed' or 'open', got {kind!r}")
    shape = _check_shape(shape)
    model = read_mod(path)
    chosen = _select(model, kind, objects)
    total, inside = _points_inside(chosen, shape)
    if total == 0:
        raise InputError(
            f"{path} has no {kind} contours (objects: "
            f"{', '.join(o.kind for o in model.objects) or 'none'}); draw them in 3dmod or pick another model"
        )
    if inside == 0:
        raise InputError(
            f"all {total} {kind} contours of {path} lie outside the volume of shape (z, y, x) = {shape}; "
            f"the model was drawn on an image of (z, y, x) = {model.shape} — use the matching tomogram"
        )
    if inside < total:
        log.warning("%s: %d of %d %s contours lie outside the volume", path, total - inside, total, kind)
    if model.xmax and model.ymax and model.zmax and model.shape != shape:
        log.warning("%s was drawn on an image of (z, y, x) = %s, the volume is %s", path, model.shape, shape)
    if kind == "closed":
        mask = rasterize_closed(model, shape, objects)
    else:
        mask = rasterize_open(model, shape, objects, diameter=diameter)
    if not mask.any():
        raise InputError(f"the {kind} contours of {path} paint no voxel (degenerate contours?)")
    return mask


# ----------------------------------------------------------------------------------- vesicles
def vesicles_to_mod(table: VesicleTable, shape: Sequence[int], name: str = "vesicles") -> ImodModel:
    """One scattered-point object ``name``: a one-point contour per vesicle, SIZE = radius (px).

    Centres go from voxel (z, y, x) to IMOD (x + 0.5, y + 0.5, z); the header holds the image size
    from ``shape`` (z, y, x) and the pixel size in nm from ``table.voxel_size``. 3dmod shows each
    point as a sphere of its radius.
    """
    nz, ny, nx = _check_shape(shape)
    c = table.centres
    r = table.radii
    contours = [
        ImodContour(points=[[x + 0.5, y + 0.5, z]], sizes=[rad])
        for (z, y, x), rad in zip(c, r)
    ]
    obj = ImodObject.of_kind(
        "scattered", name=name, colour=(1.0, 0.55, 0.0),
        sphere_size=max(1, int(round(float(np.median(r))))) if len(r) else 1, contours=contours,
    )
    return ImodModel(
        objects=[obj], xmax=nx, ymax=ny, zmax=nz, pixel_size=table.voxel_size / 10.0, units=UNIT_NM,
    )


def mod_to_vesicles(
    model: ImodModel, voxel_size: float | None = None, object: int | str | None = None  # noqa: A002
) -> VesicleTable:
    """Spheres from scattered-point objects: every point is a vesicle (centre, radius in px).

    A point's radius is its SIZE value, or the object's sphere size when it has none (negative
    size or no SIZE chunk). ``object`` (1-based number or name) picks one object; default: all
    scattered objects. ``voxel_size`` (Å) overrides the model header's pixel size. Adds the column
    ``imod_object`` (1-based object number).
    """
    if object is None:
        picked = [(k, o) for k, o in enumerate(model.objects, start=1) if o.scattered]
        if not picked:
            raise InputError(
                "IMOD model has no scattered-point object; vesicles must be drawn as scattered points (spheres)"
            )
    else:
        obj = _select(model, "scattered", [object])[0]
        k = next(i for i, o in enumerate(model.objects, start=1) if o is obj)
        if not obj.scattered:
            raise InputError(f"IMOD object {object!r} holds {obj.kind} contours, not scattered points (spheres)")
        picked = [(k, obj)]
    if voxel_size is None:
        header = model.pixel_size_angstrom
        if header is None:
            raise VoxelSizeError(
                f"the IMOD model has no pixel size (units: {model.units_name}); pass --voxel-size ANGSTROM"
            )
        vs = validate_voxel_size(header, source="IMOD model header")[2]
    else:
        vs = validate_voxel_size(voxel_size, source="--voxel-size option")[2]
    centres, radii, objnum = [], [], []
    for k, obj in picked:
        for cont in obj.contours:
            n = len(cont.points)
            if n == 0:
                continue
            sizes = cont.sizes if cont.sizes is not None else np.full(n, -1.0)
            rad = np.where(sizes >= 0, sizes, float(obj.sphere_size))
            if np.any(rad <= 0):
                raise InputError(
                    f"IMOD object {k} ({obj.name!r}) has points without a size and sphere size "
                    f"{obj.sphere_size}; set point sizes or the object's sphere size in 3dmod"
                )
            p = cont.points
            centres.append(np.column_stack([p[:, 2], p[:, 1] - 0.5, p[:, 0] - 0.5]))
            radii.append(rad)
            objnum.append(np.full(n, k))
    if not centres:
        return VesicleTable.from_spheres(np.zeros((0, 3)), np.zeros(0), vs, imod_object=np.zeros(0, int))
    return VesicleTable.from_spheres(
        np.concatenate(centres), np.concatenate(radii), vs, imod_object=np.concatenate(objnum)
    )


def read_vesicles_mod(
    path: str | Path, voxel_size: float | None = None, object: int | str | None = None  # noqa: A002
) -> VesicleTable:
    """Read vesicles (scattered points with sizes) from an IMOD model; see :func:`mod_to_vesicles`."""
    return mod_to_vesicles(read_mod(path), voxel_size=voxel_size, object=object)


def write_vesicles_mod(path: str | Path, table: VesicleTable, shape: Sequence[int]) -> Path:
    """Write ``table`` as an IMOD model of spheres (see :func:`vesicles_to_mod`), atomically."""
    return write_mod(path, vesicles_to_mod(table, shape))


__all__ = [
    "ImodContour",
    "ImodModel",
    "ImodObject",
    "mask_from_mod",
    "mod_to_vesicles",
    "model_to_bytes",
    "parse_mod",
    "rasterize_closed",
    "rasterize_open",
    "read_mod",
    "read_vesicles_mod",
    "vesicles_to_mod",
    "write_mod",
    "write_vesicles_mod",
]
