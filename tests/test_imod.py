"""IMOD binary model I/O, the IMOD coordinate convention, rasterisation and vesicle conversion."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryoves.errors import FormatError, InputError, VoxelSizeError
from cryoves.io.imod import (
    OBJ_OPEN,
    OBJ_SCATTERED,
    ImodContour,
    ImodModel,
    ImodObject,
    mask_from_mod,
    mod_to_vesicles,
    model_to_bytes,
    parse_mod,
    rasterize_closed,
    rasterize_open,
    read_mod,
    read_vesicles_mod,
    vesicles_to_mod,
    write_mod,
    write_vesicles_mod,
)
from cryoves.vesicles import VesicleTable

HEADER_END = 8 + 232  # "IMOD" "V1.2" + model header
OBJECT_BYTES = 176


def square(x0: float, y0: float, x1: float, y1: float, z: float) -> list[list[float]]:
    return [[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]]


def mixed_model() -> ImodModel:
    """A model with one object of each kind, per-point sizes, names, colours and header values."""
    closed = ImodObject.of_kind(
        "closed", name="cell outline", colour=(0.1, 0.2, 0.3),
        contours=[ImodContour(square(1, 1, 9, 9, z), flags=0, time=0, surf=1) for z in (2, 3)],
    )
    opened = ImodObject.of_kind("open", name="active zone", contours=[
        ImodContour([[1.5, 2.5, 4.0], [8.5, 2.5, 4.0], [8.5, 7.25, 4.0]]),
    ])
    scat = ImodObject.of_kind("scattered", name="vesicles", sphere_size=7, contours=[
        ImodContour([[3.5, 4.5, 1.0]], sizes=[5.25]),
        ImodContour([[6.5, 2.5, 5.0], [7.5, 8.5, 6.0]]),  # no SIZE chunk
    ])
    return ImodModel(
        objects=[closed, opened, scat], xmax=12, ymax=11, zmax=10, pixel_size=2.2, units=-9,
        scale=(1.0, 1.0, 1.5), name="test model",
    )


def assert_models_equal(a: ImodModel, b: ImodModel) -> None:
    assert (a.xmax, a.ymax, a.zmax, a.units, a.name) == (b.xmax, b.ymax, b.zmax, b.units, b.name)
    assert a.pixel_size == pytest.approx(b.pixel_size, rel=1e-6)
    assert np.allclose(a.scale, b.scale)
    assert len(a.objects) == len(b.objects)
    for oa, ob in zip(a.objects, b.objects):
        assert (oa.name, oa.flags, oa.kind, oa.sphere_size) == (ob.name, ob.flags, ob.kind, ob.sphere_size)
        assert np.allclose(oa.colour, ob.colour)
        assert len(oa.contours) == len(ob.contours)
        for ca, cb in zip(oa.contours, ob.contours):
            assert np.array_equal(ca.points.astype(np.float32), cb.points.astype(np.float32))
            assert (ca.flags, ca.time, ca.surf) == (cb.flags, cb.time, cb.surf)
            assert (ca.sizes is None) == (cb.sizes is None)
            if ca.sizes is not None:
                assert np.allclose(ca.sizes, cb.sizes)


# ------------------------------------------------------------------------------- format
def test_round_trip_through_file(tmp_path):
    model = mixed_model()
    path = write_mod(tmp_path / "sub" / "m.mod", model)
    back = read_mod(path)
    assert_models_equal(model, back)
    assert [o.kind for o in back.objects] == ["closed", "open", "scattered"]
    assert back.pixel_size_angstrom == pytest.approx(22.0)
    assert back.units_name == "nm"


def test_byte_layout_matches_imod_spec():
    """Offsets and big-endian values follow IMOD's binary format description, not our reader."""
    model = mixed_model()
    data = model_to_bytes(model)
    assert data[:8] == b"IMOD" + b"V1.2"
    assert data[8:18] == b"test model"
    xmax, ymax, zmax, objsize = struct.unpack(">4i", data[136:152])
    assert (xmax, ymax, zmax, objsize) == (12, 11, 10, 3)
    zscale = struct.unpack(">f", data[8 + 128 + 36 + 20 : 8 + 128 + 36 + 24])[0]
    assert zscale == pytest.approx(1.5)
    pixsize, units = struct.unpack(">fi", data[8 + 208 : 8 + 216])
    assert (pixsize, units) == (pytest.approx(2.2), -9)
    assert data[HEADER_END : HEADER_END + 4] == b"OBJT"
    obj = data[HEADER_END + 4 : HEADER_END + 4 + OBJECT_BYTES]
    assert obj[:12] == b"cell outline"
    contsize, flags = struct.unpack(">iI", obj[128:136])
    assert (contsize, flags) == (2, 0)
    cont = HEADER_END + 4 + OBJECT_BYTES
    assert data[cont : cont + 4] == b"CONT"
    psize = struct.unpack(">i", data[cont + 4 : cont + 8])[0]
    assert psize == 4
    assert struct.unpack(">3f", data[cont + 20 : cont + 32]) == (1.0, 1.0, 2.0)
    assert data.endswith(b"IEOF")
    # the scattered object: flags open | scattered, sphere size, and one SIZE chunk of 4 bytes
    k = data.index(b"vesicles")
    sflags = struct.unpack(">I", data[k + 132 : k + 136])[0]
    assert sflags == OBJ_SCATTERED | OBJ_OPEN
    assert struct.unpack(">i", data[k + 156 : k + 160])[0] == 7
    s = data.index(b"SIZE")
    assert struct.unpack(">if", data[s + 4 : s + 12]) == (4, 5.25)
    assert data.count(b"SIZE") == 1


def _chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack(">i", len(body)) + body


def test_reader_skips_optional_chunks_and_keeps_material():
    """MESH (no size field), IMAT, VIEW, MOST, LABL are skipped; contours after them still read."""
    base = model_to_bytes(ImodModel(objects=[ImodObject.of_kind("closed")], xmax=4, ymax=4, zmax=2))
    head, tail = base[: HEADER_END + 4 + OBJECT_BYTES], base[HEADER_END + 4 + OBJECT_BYTES :]
    assert tail == b"IEOF"
    mesh = b"MESH" + struct.pack(">iiIhh", 2, 3, 0, 0, 0) + np.zeros(6, ">f4").tobytes() + struct.pack(">3i", 0, 1, -1)
    imat = _chunk(b"IMAT", bytes(range(16)))
    label = _chunk(b"LABL", b"\x00" * 12)
    cont = b"CONT" + struct.pack(">iIii", 3, 0, 0, 0) + np.array(square(0, 0, 2, 2, 1)[:3], ">f4").tobytes()
    data = head + mesh + imat + cont + label + _chunk(b"VIEW", b"\x01" * 40) + _chunk(b"MOST", b"") + b"IEOF"
    # header says 1 object with 0 contours; patch the object's contour count to 1
    data = bytearray(data)
    data[HEADER_END + 4 + 128 : HEADER_END + 4 + 132] = struct.pack(">i", 1)
    model = parse_mod(bytes(data))
    obj = model.objects[0]
    assert len(obj.contours) == 1 and obj.contours[0].points.shape == (3, 3)
    assert obj.imat == bytes(range(16))
    # written back: IMAT kept verbatim, mesh dropped
    again = model_to_bytes(model)
    assert _chunk(b"IMAT", bytes(range(16))) in again and b"MESH" not in again


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 not a model", "does not start with 'IMOD'"),
        (b"imod 1\nobject 0 1 0\n", "ASCII"),
        (b"IMODV0.1" + bytes(300), "version"),
        (b"IMODV1.2" + bytes(100), "truncated"),
    ],
)
def test_corrupt_files_give_format_error(data, match):
    with pytest.raises(FormatError, match=match):
        parse_mod(data)


def test_truncated_and_inflated_counts_give_format_error():
    good = model_to_bytes(mixed_model())
    with pytest.raises(FormatError, match="IEOF"):
        parse_mod(good[:-4])
    # a contour claiming 2**30 points must fail on the size check, not by allocating 12 GB
    cont = good.index(b"CONT")
    bad = bytearray(good)
    bad[cont + 4 : cont + 8] = struct.pack(">i", 2**30)
    with pytest.raises(FormatError, match="does not fit"):
        parse_mod(bytes(bad))
    bad = bytearray(good)
    bad[8 + 140 : 8 + 144] = struct.pack(">i", 10**9)  # objsize
    with pytest.raises(FormatError, match="object count"):
        parse_mod(bytes(bad))
    s = good.index(b"SIZE")
    bad = bytearray(good)
    bad[s + 4 : s + 8] = struct.pack(">i", 8)  # SIZE bytes != 4 * psize
    with pytest.raises(FormatError, match="SIZE"):
        parse_mod(bytes(bad))


def test_model_saved_on_flipped_view_is_flipped_back():
    model = ImodModel(objects=[ImodObject.of_kind("scattered", contours=[ImodContour([[1.5, 7.0, 2.5]])])],
                      xmax=10, ymax=5, zmax=20, flags=1 << 16)
    back = parse_mod(model_to_bytes(model))
    assert back.objects[0].contours[0].points.tolist() == [[1.5, 2.5, 7.0]]
    assert back.shape == (5, 20, 10) and not back.flags & (1 << 16)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        read_mod(tmp_path / "nope.mod")
    assert not isinstance(info.value, FormatError)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    _model_or_format_error(data)
    _model_or_format_error(b"IMODV1.2" + data)


_GOOD = model_to_bytes(mixed_model())


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_GOOD) - 1), st.binary(min_size=1, max_size=8), st.integers(0, len(_GOOD)))
def test_fuzz_mutated_valid_file(pos, patch, cut):
    data = bytearray(_GOOD)
    data[pos : pos + len(patch)] = patch
    _model_or_format_error(bytes(data))
    _model_or_format_error(_GOOD[:cut])


def _model_or_format_error(data: bytes) -> None:
    try:
        model = parse_mod(data)
    except FormatError:
        return
    assert isinstance(model, ImodModel)
    for obj in model.objects:
        for cont in obj.contours:
            assert np.isfinite(cont.points).all()


def test_writer_refuses_bad_contours_and_leaves_no_file(tmp_path):
    bad = ImodModel(objects=[ImodObject.of_kind("closed", contours=[ImodContour([[np.nan, 0, 0]])])])
    with pytest.raises(InputError, match="non-finite"):
        write_mod(tmp_path / "bad.mod", bad)
    assert list(tmp_path.iterdir()) == []
    wrong_sizes = ImodModel(objects=[ImodObject.of_kind("scattered", contours=[ImodContour([[1, 1, 1]], sizes=[1, 2])])])
    with pytest.raises(InputError, match="sizes"):
        model_to_bytes(wrong_sizes)
    with pytest.raises(InputError, match="kind"):
        ImodObject.of_kind("spline")


# ------------------------------------------------------------------------------- convention
def test_voxel_centre_maps_to_imod_pixel_centre():
    """Voxel (z=3, y=4, x=5) is written as IMOD (x, y, z) = (5.5, 4.5, 3): x/y count pixel edges."""
    table = VesicleTable.from_spheres([[3, 4, 5]], [6.0], voxel_size=22.0)
    data = model_to_bytes(vesicles_to_mod(table, (10, 20, 30)))
    c = data.index(b"CONT")
    assert struct.unpack(">i", data[c + 4 : c + 8])[0] == 1
    assert struct.unpack(">3f", data[c + 20 : c + 32]) == (5.5, 4.5, 3.0)
    assert struct.unpack(">f", data[c + 40 : c + 44])[0] == 6.0  # SIZE chunk: radius in pixels


def test_closed_square_fills_exactly_the_enclosed_pixel_centres():
    # edges at x = 2 and 5, y = 3 and 7 enclose the centres 2.5..4.5 and 3.5..6.5
    model = ImodModel(objects=[ImodObject.of_kind("closed", contours=[ImodContour(square(2, 3, 5, 7, 4))])])
    mask = rasterize_closed(model, (6, 10, 10))
    expected = np.zeros((6, 10, 10), bool)
    expected[4, 3:7, 2:5] = True
    assert np.array_equal(mask, expected)


def test_contour_section_is_rounded_z_and_empty_sections_stay_empty():
    model = ImodModel(objects=[ImodObject.of_kind("closed", contours=[
        ImodContour(square(0, 0, 4, 4, 2.6)), ImodContour(square(0, 0, 4, 4, 0.4)),
    ])])
    mask = rasterize_closed(model, (5, 6, 6))
    assert mask.any(axis=(1, 2)).tolist() == [True, False, False, True, False]


def test_nested_contours_even_odd():
    """Outline, hole, island: nesting level 1 and 3 filled, level 2 empty."""
    model = ImodModel(objects=[ImodObject.of_kind("closed", contours=[
        ImodContour(square(4, 4, 8, 8, 0)),  # island (given first on purpose)
        ImodContour(square(0, 0, 12, 12, 0)),  # outline
        ImodContour(square(2, 2, 10, 10, 0)),  # hole
    ])])
    sec = rasterize_closed(model, (1, 12, 12))[0]
    yy, xx = np.mgrid[0:12, 0:12] + 0.5
    inside = lambda a, b: (xx > a) & (xx < b) & (yy > a) & (yy < b)  # noqa: E731
    assert np.array_equal(sec, inside(0, 12) & ~inside(2, 10) | inside(4, 8))


def test_polygon_fill_matches_point_in_polygon_reference():
    rng = np.random.default_rng(3)
    from matplotlib.path import Path as MplPath

    for _ in range(5):
        ang = np.sort(rng.uniform(0, 2 * np.pi, 12))
        rad = rng.uniform(5, 14, 12)
        xy = np.column_stack([16 + rad * np.cos(ang), 15 + rad * np.sin(ang)]) + 0.123
        pts = np.column_stack([xy, np.zeros(len(xy))])
        mask = rasterize_closed(ImodModel(objects=[ImodObject.of_kind("closed", contours=[ImodContour(pts)])]), (1, 30, 32))
        yy, xx = np.mgrid[0:30, 0:32] + 0.5
        ref = MplPath(xy).contains_points(np.column_stack([xx.ravel(), yy.ravel()])).reshape(30, 32)
        assert np.array_equal(mask[0], ref)


def test_open_contour_tube_of_three_pixels():
    line = [[5.5, 10.5, 2.0], [15.5, 10.5, 2.0]]
    model = ImodModel(objects=[ImodObject.of_kind("open", contours=[ImodContour(line)])])
    mask = rasterize_open(model, (4, 20, 20), diameter=3.0)
    assert not mask[[0, 1, 3]].any()
    yy, xx = np.mgrid[0:20, 0:20] + 0.5
    t = np.clip((xx - 5.5) / 10.0, 0, 1)
    expected = (xx - (5.5 + 10 * t)) ** 2 + (yy - 10.5) ** 2 <= 1.5**2
    assert np.array_equal(mask[2], expected)
    assert mask[2].sum(axis=0).max() == 3  # 3 pixels across
    # closed objects are not drawn as tubes and vice versa
    assert not rasterize_closed(model, (4, 20, 20)).any()


# ------------------------------------------------------------------------------- masks from files
def test_mask_from_mod(tmp_path):
    path = write_mod(tmp_path / "m.mod", mixed_model())
    cyto = mask_from_mod(path, (10, 11, 12), kind="closed")
    assert cyto.dtype == bool and cyto[2].sum() == 64 and cyto[3].sum() == 64 and cyto.sum() == 128
    az = mask_from_mod(path, (10, 11, 12), kind="open")
    assert az[4].any() and az.sum() == az[4].sum()
    with pytest.raises(InputError, match="kind"):
        mask_from_mod(path, (10, 11, 12), kind="scattered")


def test_mask_from_mod_errors(tmp_path):
    outside = ImodModel(
        objects=[ImodObject.of_kind("closed", contours=[ImodContour(square(500, 500, 600, 600, 3))])],
        xmax=1000, ymax=1000, zmax=10,
    )
    p = write_mod(tmp_path / "outside.mod", outside)
    with pytest.raises(InputError, match="outside the volume"):
        mask_from_mod(p, (10, 64, 64))
    with pytest.raises(InputError, match="no open contours"):
        mask_from_mod(p, (10, 64, 64), kind="open")
    empty = write_mod(tmp_path / "empty.mod", ImodModel())
    with pytest.raises(InputError, match="no closed contours"):
        mask_from_mod(empty, (4, 4, 4))
    junk = tmp_path / "junk.mod"
    junk.write_bytes(b"IMODV1.2 garbage")
    with pytest.raises(FormatError):
        mask_from_mod(junk, (4, 4, 4))
    with pytest.raises(InputError, match="does not exist"):
        rasterize_closed(outside, (4, 4, 4), objects=[2])


# ------------------------------------------------------------------------------- vesicles
def test_vesicles_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 40, (25, 3))
    radii = rng.uniform(8, 20, 25)
    table = VesicleTable.from_spheres(centres, radii, voxel_size=14.69)
    path = write_vesicles_mod(tmp_path / "v.mod", table, (50, 60, 70))
    model = read_mod(path)
    assert model.shape == (50, 60, 70)
    assert [o.kind for o in model.objects] == ["scattered"] and model.objects[0].name == "vesicles"
    assert all(len(c.points) == 1 and c.sizes is not None for c in model.objects[0].contours)
    back = read_vesicles_mod(path)
    assert back.voxel_size == pytest.approx(14.69)
    assert np.allclose(back.centres, table.centres, atol=1e-4)
    assert np.allclose(back.radii, table.radii, rtol=1e-6)
    assert back.df["imod_object"].tolist() == [1] * 25


def test_mod_to_vesicles_sizes_objects_and_voxel_size():
    model = mixed_model()
    t = mod_to_vesicles(model)
    # point with SIZE keeps it; points without SIZE take the object's sphere size (7)
    assert t.radii.tolist() == [5.25, 7.0, 7.0]
    assert np.allclose(t.centres, [[1, 4, 3], [5, 2, 6], [6, 8, 7]])
    assert t.voxel_size == pytest.approx(22.0)
    assert mod_to_vesicles(model, voxel_size=10.0).voxel_size == 10.0
    assert len(mod_to_vesicles(model, object="vesicles")) == 3
    assert len(mod_to_vesicles(model, object=3)) == 3
    with pytest.raises(InputError, match="not scattered"):
        mod_to_vesicles(model, object=1)
    with pytest.raises(InputError, match="no object named"):
        mod_to_vesicles(model, object="mitochondria")
    model.units = 0
    with pytest.raises(VoxelSizeError, match="no pixel size"):
        mod_to_vesicles(model)
    model.objects[2].sphere_size = 0
    with pytest.raises(InputError, match="without a size"):
        mod_to_vesicles(model, voxel_size=10.0)
    with pytest.raises(InputError, match="no scattered"):
        mod_to_vesicles(ImodModel(objects=[ImodObject.of_kind("closed")]), voxel_size=10.0)


def test_empty_vesicle_table_round_trips(tmp_path):
    path = write_vesicles_mod(tmp_path / "e.mod", VesicleTable.empty(20.0), (4, 5, 6))
    back = read_vesicles_mod(path)
    assert len(back) == 0 and back.voxel_size == pytest.approx(20.0)
