"""Fuzzing the parsers we own (issue 10): MRC header handling, IMOD .mod reader, CSV/STAR tables.

Structured hypothesis strategies mutate valid files field by field (and raw bytes); every input must
give a result or one of our typed errors (``cryoves.errors``), never another exception. A bounded
atheris (libFuzzer) run per parser is part of the suite when atheris is installed; longer runs:
``python bench/fuzz_long.py`` (see docs/hardening.md). tests/test_imod.py already fuzzes
``parse_mod`` alone; here the .mod bytes also go through the consumers (vesicles, masks).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _hardening_utils import (
    MRC_BYTES_FIELDS,
    MRC_FLOAT32_FIELDS,
    MRC_INT32_FIELDS,
    fuzz_mod,
    fuzz_mrc,
    fuzz_table,
    valid_mrc_bytes,
)

SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ MRC
_SEEDS = {dt: valid_mrc_bytes(dt) for dt in (np.float32, np.int8, np.int16, np.uint16, np.float16)}
_int32 = st.one_of(st.integers(-4, 20), st.sampled_from([2**31 - 1, -(2**31), 1024, 4096, 2**20]),
                   st.integers(-(2**31), 2**31 - 1))
_float32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -1.0, 1.0, 0.0018, 1e4, 1e38]))
_field_edit = st.one_of(
    st.tuples(st.just("i"), st.sampled_from(sorted(MRC_INT32_FIELDS.values())), _int32),
    st.tuples(st.just("f"), st.sampled_from(sorted(MRC_FLOAT32_FIELDS.values())), _float32),
    st.tuples(st.just("b"), st.sampled_from(sorted(MRC_BYTES_FIELDS.values())), st.binary(min_size=4, max_size=4)),
)


@settings(SETTINGS, max_examples=1000)
@given(seed=st.sampled_from(sorted(_SEEDS, key=str)), edits=st.lists(_field_edit, min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 2000)), extra=st.binary(max_size=64), big=st.booleans())
def test_fuzz_mrc_header_fields(seed, edits, cut, extra, big):
    raw = bytearray(_SEEDS[seed])
    order = ">" if big else "<"
    if big:  # a big-endian file: swap the machine stamp and the header words the edits touch
        raw[212:216] = b"\x11\x11\x00\x00"
    for kind, word, value in edits:
        if kind == "i":
            raw[4 * word : 4 * word + 4] = struct.pack(order + "i", value)
        elif kind == "f":
            raw[4 * word : 4 * word + 4] = struct.pack(order + "f", value)
        else:
            raw[word : word + 4] = value
    data = bytes(raw[:cut] if cut is not None else raw) + extra
    fuzz_mrc(data)


@settings(SETTINGS, max_examples=300)
@given(st.binary(max_size=3000))
def test_fuzz_mrc_random_bytes(data):
    fuzz_mrc(data)
    fuzz_mrc(_SEEDS[np.float32][:1024] + data)  # a valid header in front of random data


# ------------------------------------------------------------------------------------ IMOD
_coord = st.one_of(st.floats(-50, 50), st.floats(-1e30, 1e30), st.sampled_from([0.0, -0.5, 1e9]))


@st.composite
def imod_models(draw):
    from cryoves.io.imod import ImodContour, ImodModel, ImodObject

    objects = []
    for _ in range(draw(st.integers(0, 3))):
        contours = []
        for _ in range(draw(st.integers(0, 3))):
            n = draw(st.integers(0, 5))
            pts = np.array([[draw(_coord) for _ in range(3)] for _ in range(n)], float).reshape(-1, 3)
            sizes = None
            if n and draw(st.booleans()):
                sizes = np.array([draw(st.floats(-5, 50)) for _ in range(n)])
            contours.append(ImodContour(pts, sizes=sizes, flags=draw(st.sampled_from([0, 8, 16]))))
        obj = ImodObject.of_kind(draw(st.sampled_from(["closed", "open", "scattered"])), name="o",
                                 sphere_size=draw(st.integers(-2, 20)), contours=contours)
        objects.append(obj)
    return ImodModel(objects=objects, xmax=draw(st.integers(-5, 5000)), ymax=draw(st.integers(-5, 5000)),
                     zmax=draw(st.integers(-5, 500)), pixel_size=draw(st.floats(-5, 100, width=32)),
                     units=draw(st.sampled_from([0, -9, -10, 1, 3, 99])))


@settings(SETTINGS, max_examples=500)
@given(model=imod_models(), pos=st.integers(0, 10**6), patch=st.binary(max_size=6), cut=st.integers(0, 10**6))
def test_fuzz_imod_models_through_consumers(model, pos, patch, cut):
    from cryoves.errors import CryovesError
    from cryoves.io.imod import model_to_bytes

    try:
        good = model_to_bytes(model)
    except CryovesError:
        return
    fuzz_mod(good)
    mutated = bytearray(good)
    p = pos % len(mutated)
    mutated[p : p + len(patch)] = patch
    fuzz_mod(bytes(mutated))
    fuzz_mod(good[: cut % (len(good) + 1)])


# ------------------------------------------------------------------------------------ tables
_cell = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6),
                  st.sampled_from(["", "nan", "abc", "1e400", "-0", "1,2", '"q"']))
_CSV_COLUMNS = ["id", "z", "y", "x", "radius", "z_nm", "y_nm", "x_nm", "radius_nm", "source", "extra"]


@settings(SETTINGS, max_examples=400)
@given(cols=st.lists(st.sampled_from(_CSV_COLUMNS), min_size=0, max_size=8),
       rows=st.lists(st.lists(_cell, min_size=8, max_size=8), max_size=5))
def test_fuzz_csv_tables(cols, rows):
    lines = [",".join(cols)] + [",".join(str(v) for v in r[: len(cols)]) for r in rows]
    fuzz_table("\n".join(lines).encode())


_STAR_COLUMNS = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "cryovesRadius", "rlnVesicleRadius",
                 "cryovesId", "rlnImagePixelSize", "rlnDetectorPixelSize", "cryoves_source", "rlnMagnification"]


@settings(SETTINGS, max_examples=400)
@given(blocks=st.lists(st.tuples(st.sampled_from(["vesicles", "optics", "particles", ""]),
                                 st.lists(st.sampled_from(_STAR_COLUMNS), max_size=7, unique=True),
                                 st.lists(st.lists(_cell, min_size=7, max_size=7), max_size=4),
                                 st.booleans()), min_size=1, max_size=3))
def test_fuzz_star_tables(blocks):
    text = []
    for name, cols, rows, loop in blocks:
        text.append(f"data_{name}\n")
        if loop:
            text.append("loop_\n" + "".join(f"_{c} #{i + 1}\n" for i, c in enumerate(cols)))
            text += [" ".join(str(v) for v in r[: len(cols)]) + "\n" for r in rows]
        else:
            text += [f"_{c} {r[0] if r else 1}\n" for c, r in zip(cols, rows + [[]] * len(cols))]
        text.append("\n")
    fuzz_table("".join(text).encode())


@settings(SETTINGS, max_examples=300)
@given(st.binary(max_size=800))
def test_fuzz_tables_random_bytes(data):
    fuzz_table(data)


# ------------------------------------------------------------------------------------ atheris
@pytest.mark.parametrize("target", ["mrc", "mod", "table"])
def test_atheris_bounded_run(target, tmp_path):
    """A fixed libFuzzer seed and run count, so CI replays the same inputs every time; open-ended
    (clock-seeded, time-bounded) runs belong to ``bench/fuzz_long.py``."""
    pytest.importorskip("atheris")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz_long.py"), "--engine", "atheris",
                           "--target", target, "--seed", "1", "--runs", "1500", "--corpus", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "inputs tried" in proc.stdout


def test_mutation_fuzzer_bounded_run(tmp_path):
    """The dependency-free engine of bench/fuzz_long.py, a few seconds per parser, in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_long", ROOT / "bench" / "fuzz_long.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for target in mod.TARGETS:
        n, crashes = mod.run_mutate(target, 3.0, tmp_path, seed=1)
        assert n > 20 and crashes == 0, (target, n, crashes)


@pytest.mark.parametrize(("text", "match"), [
    # found by bench/fuzz_long.py: a duplicated loop column made pandas raise ValueError
    ("data_vesicles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnCoordinateZ #3\n_cryovesRadius #4\n"
     "_cryovesRadius #5\n4 3 2 2 2\n", "lists the column cryovesRadius twice"),
    ("data_optics\n\n_rlnImagePixelSize abc\n\ndata_vesicles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
     "_rlnCoordinateZ #3\n_cryovesRadius #4\n4 3 2 2\n", "rlnImagePixelSize 'abc' is not a number"),
])
def test_star_fuzz_regressions(tmp_path, text, match):
    from cryoves.errors import FormatError, VoxelSizeError
    from cryoves.io.tables import read_vesicles

    p = tmp_path / "t.star"
    p.write_text(text)
    with pytest.raises((FormatError, VoxelSizeError), match=match):
        read_vesicles(p)


def test_table_fuzz_regression_id_beyond_int64(tmp_path):
    """Found by atheris in CI: an id of 70 digits made pandas raise OverflowError (an internal error)."""
    from cryoves.errors import FormatError
    from cryoves.io.tables import read_vesicles

    p = tmp_path / "t.csv"
    p.write_text("id,z,y,x,radius,z_nm,y_nm,x_nm,radius_nm\n" + "16" * 35 + ",2,3,4,2,4.4,6.6,8.8,4.4\n"
                 "2,4,6,8.5,3,8.8,13.2,18.7,6.6\n")
    with pytest.raises(FormatError, match="integers below"):
        read_vesicles(p)


def test_mrc_fuzz_regression_volume_stack_with_mz_zero(tmp_path):
    """Found by atheris: no 'MAP ' id (permissive fallback) + ISPG 401 (volume stack) + MZ 0 made
    mrcfile raise ZeroDivisionError, reported as an internal error."""
    from cryoves.errors import FormatError
    from cryoves.io import read_mrc

    raw = bytearray(valid_mrc_bytes(np.float32))
    raw[208:212] = b"\0\0\0\0"  # MAP id
    raw[4 * 22 : 4 * 22 + 4] = struct.pack("<i", 401)  # ISPG: volume stack
    raw[4 * 9 : 4 * 9 + 4] = struct.pack("<i", 0)  # MZ
    p = tmp_path / "stack.mrc"
    p.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="not a valid MRC file"):
        read_mrc(p)
