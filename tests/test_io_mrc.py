"""MRC reading/writing: modes, voxel size and origin, axis mapping, bad files."""

from __future__ import annotations

import logging

import mrcfile
import numpy as np
import pytest

from cryoves.errors import FormatError, InputError, VoxelSizeError
from cryoves.io import read_label_volume, read_mrc, read_tomogram, tomogram_info, write_mrc
from cryoves.io.tomogram import validate_volume, validate_voxel_size, value_stats

RNG = np.random.default_rng(7)


def _volume(dtype, shape=(6, 7, 8)):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return RNG.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_mrc_roundtrip_modes(tmp_path, dtype):
    data = _volume(dtype)
    p = write_mrc(tmp_path / "a.mrc", data, (12.5, 13.0, 14.0), origin=(1.0, -2.0, 3.5))
    t = read_mrc(p)
    assert t.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(t.data), data)
    np.testing.assert_allclose(t.voxel_size, (12.5, 13.0, 14.0), rtol=1e-6)
    np.testing.assert_allclose(t.origin, (1.0, -2.0, 3.5))
    assert not t.is_isotropic


def test_uint8_is_stored_as_mode6_and_reads_back_equal(tmp_path):
    data = _volume(np.uint8)
    p = write_mrc(tmp_path / "u8.mrc", data, 10.0)
    with mrcfile.open(p) as m:
        assert int(m.header.mode) == 6
    t = read_mrc(p)
    np.testing.assert_array_equal(np.asarray(t.data), data.astype(np.uint16))


def _set_imod_flags(path, flags):
    with mrcfile.open(path, mode="r+") as m:
        extra2 = bytearray(m.header.extra2.tobytes())
        extra2[40:44] = np.int32(1146047817).tobytes()
        extra2[44:48] = np.int32(flags).tobytes()
        m.header.extra2 = bytes(extra2)


@pytest.mark.parametrize("flags, expect", [(0, np.uint8), (1, np.int8)])
def test_mode0_follows_imod_signed_flag(tmp_path, flags, expect):
    raw = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10  # values up to 230
    p = tmp_path / "m0.mrc"
    with mrcfile.new(p) as m:
        m.set_data(raw.view(np.int8))
        m.voxel_size = 10.0
    _set_imod_flags(p, flags)
    t = read_mrc(p)
    assert t.dtype == np.dtype(expect)
    np.testing.assert_array_equal(np.asarray(t.data), raw.view(expect))


def test_mode0_without_imod_stamp_is_signed(tmp_path):
    p = tmp_path / "m0.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.full((2, 3, 4), -5, dtype=np.int8))
        m.voxel_size = 10.0
    assert read_mrc(p).dtype == np.int8


def test_axis_mapping_is_applied(tmp_path):
    data = _volume(np.float32, (3, 4, 5))  # stored as (sections, rows, cols)
    p = tmp_path / "map.mrc"
    with mrcfile.new(p) as m:
        m.set_data(data)
        m.voxel_size = 10.0
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1  # columns are z, sections are x
    t = read_mrc(p)
    assert t.shape == (5, 4, 3)
    np.testing.assert_array_equal(np.asarray(t.data), data.transpose(2, 1, 0))
    assert any("axis mapping" in n for n in t.header_notes)


def test_read_is_memory_mapped_and_input_unchanged(tmp_path):
    p = write_mrc(tmp_path / "a.mrc", _volume(np.float32), 10.0)
    before = p.read_bytes()
    t = read_mrc(p)
    assert isinstance(t.data, np.memmap)
    with pytest.raises(ValueError):
        t.data[0, 0, 0] = 1  # read-only
    assert p.read_bytes() == before


def test_truncated_mrc(tmp_path):
    p = write_mrc(tmp_path / "a.mrc", _volume(np.float32, (10, 20, 20)), 10.0)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        read_mrc(p)
    with pytest.raises(FormatError, match="truncated"):
        read_mrc(p, mmap=False)


def test_wrong_extended_header_size(tmp_path):
    p = tmp_path / "ext.mrc"
    with mrcfile.new(p) as m:
        m.set_data(_volume(np.float32))
        m.voxel_size = 10.0
        m.header.nsymbt = 4096  # claims an extended header that is not there
    with pytest.raises(FormatError, match="4096-byte extended header"):
        read_mrc(p)


@pytest.mark.parametrize("content, match", [(b"", "shorter than"), (b"hello" * 300, "not a valid MRC")])
def test_not_an_mrc(tmp_path, content, match):
    p = tmp_path / "bad.mrc"
    p.write_bytes(content)
    with pytest.raises(FormatError, match=match):
        read_mrc(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_tomogram(tmp_path / "nope.mrc")


def test_nan_data(tmp_path):
    data = _volume(np.float32)
    data[2, 3, 4] = np.nan
    data[1, 1, 1] = np.inf
    p = write_mrc(tmp_path / "nan.mrc", data, 10.0)
    with pytest.raises(InputError, match="2 NaN/Inf"):
        read_mrc(p)


@pytest.mark.parametrize("shape", [(7, 8), (1, 7, 8)])
def test_2d_input_rejected(tmp_path, shape):
    p = tmp_path / "img.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.zeros(shape, np.float32))
        m.voxel_size = 10.0
    with pytest.raises(InputError, match="2-D"):
        read_mrc(p)


@pytest.mark.parametrize(
    "value, match",
    [(0.0, "must be positive"), (-3.0, "must be positive"), (float("nan"), "not a number"),
     (1.0, "unset"), (0.0018, r"0.0018 Å .*below"), (0.4, "below"), (150.0, "above")],
)
def test_bad_header_voxel_size(tmp_path, value, match):
    p = write_mrc(tmp_path / "v.mrc", _volume(np.float32), value)
    with pytest.raises(VoxelSizeError, match=match) as exc:
        read_mrc(p)
    assert "--voxel-size" in str(exc.value)
    # the override rescues the file
    assert read_mrc(p, voxel_size=14.69).voxel_size == (14.69, 14.69, 14.69)


def test_voxel_size_rules_directly(caplog):
    assert validate_voxel_size(22.0) == (22.0, 22.0, 22.0)
    assert validate_voxel_size([20.0, 10.0, 10.0]) == (20.0, 10.0, 10.0)
    with caplog.at_level(logging.WARNING):
        validate_voxel_size([20.0, 10.0, 10.0])
    assert "anisotropic" in caplog.text
    with pytest.raises(VoxelSizeError):
        validate_voxel_size(None)
    with pytest.raises(VoxelSizeError, match="one value or three"):
        validate_voxel_size([1.5, 2.5])


def test_validate_volume_rejects_empty_and_non_numeric():
    with pytest.raises(InputError, match="empty"):
        validate_volume(np.zeros((0, 4, 4)))
    with pytest.raises(InputError, match="data type"):
        validate_volume(np.zeros((2, 4, 4), dtype=complex))


def test_value_stats_match_numpy():
    data = _volume(np.float32, (37, 9, 11))
    s = value_stats(data)
    assert s["min"] == pytest.approx(float(data.min()))
    assert s["max"] == pytest.approx(float(data.max()))
    assert s["mean"] == pytest.approx(float(data.mean(dtype=np.float64)), abs=1e-9)
    assert s["std"] == pytest.approx(float(data.std(dtype=np.float64)), rel=1e-6)
    assert s["nonfinite"] == 0


def test_tomogram_info_reports_problems_without_raising(tmp_path):
    data = _volume(np.float32, (4, 5, 6))
    data[0, 0, 0] = np.nan
    p = write_mrc(tmp_path / "bad.mrc", data, 1.0)
    info = tomogram_info(p)
    assert info["shape"] == [4, 5, 6]
    assert info["nonfinite"] == 1
    assert info["bytes_float32"] == 4 * 5 * 6 * 4
    assert any("unset" in q for q in info["problems"])
    assert any("NaN" in q for q in info["problems"])
    assert info["min"] == pytest.approx(float(np.nanmin(data)))


def test_read_label_volume_float_and_int(tmp_path):
    labels = np.zeros((5, 6, 7), np.int64)
    labels[1:3, 1:3, 1:3] = 70000  # > uint16: written as float32 by write_mrc
    p = write_mrc(tmp_path / "l.mrc", labels, 14.0)
    arr, vs = read_label_volume(p)
    assert arr.dtype == np.uint32 and vs == pytest.approx(14.0)
    np.testing.assert_array_equal(arr, labels)
    bad = write_mrc(tmp_path / "f.mrc", np.full((3, 3, 3), 0.5, np.float32), 14.0)
    with pytest.raises(FormatError, match="non-integer"):
        read_label_volume(bad)


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path, monkeypatch):
    p = write_mrc(tmp_path / "a.mrc", np.zeros((2, 3, 4), np.float32), 10.0)
    before = p.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    from cryoves.errors import OutputError
    from cryoves.io import mrc as mrc_module

    # the file cannot be created, or its blocks cannot be allocated (a full disk must be an error
    # before any voxel is written through the memory map, where it would be a crash)
    for where, name in ((mrcfile, "new_mmap"), (mrc_module.os, "posix_fallocate")):
        with monkeypatch.context() as m:
            m.setattr(where, name, broken)
            with pytest.raises(OutputError, match="disk full"):
                write_mrc(p, np.ones((2, 3, 4), np.float32), 10.0)
        assert p.read_bytes() == before
        assert [x.name for x in tmp_path.iterdir()] == ["a.mrc"]


def test_release_pages_drops_a_read_memory_map_from_resident_memory(tmp_path):
    import psutil

    path = write_mrc(tmp_path / "big.mrc", np.ones((64, 512, 512), np.float32), 10.0)  # 64 MiB
    proc = psutil.Process()
    before = proc.memory_info().rss
    tomo = read_tomogram(path)
    assert float(np.asarray(tomo.data).sum()) == 64 * 512 * 512  # every page read
    read = proc.memory_info().rss
    tomo.release_pages()
    released = proc.memory_info().rss
    assert read - before > 48 * 2**20 and read - released > 48 * 2**20
    assert float(tomo.data[10].sum()) == 512 * 512  # still readable
    Tomogram = type(tomo)
    Tomogram(np.zeros((2, 2, 2), np.float32), (1.0,) * 3).release_pages()  # in memory: nothing to do


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int16, np.uint32, bool])
def test_header_statistics_are_those_of_the_voxels_written(tmp_path, dtype):
    rng = np.random.default_rng(5)
    data = (rng.normal(size=(9, 20, 30)) * 300).astype(np.float32)
    data = np.abs(data).astype(dtype) if dtype is not np.float32 else data
    p = write_mrc(tmp_path / "s.mrc", data, 10.0)
    with mrcfile.open(p) as mrc:
        h, back = mrc.header, np.asarray(mrc.data, np.float64)
        assert np.array_equal(back, np.asarray(data, np.float64))
        assert h.dmin == np.float32(back.min()) and h.dmax == np.float32(back.max())
        assert np.isclose(h.dmean, back.mean(), rtol=1e-6) and np.isclose(h.rms, back.std(), rtol=1e-5)
    data = np.ones((2, 3, 4), np.float32)
    data[0, 0, 0] = np.nan
    with mrcfile.open(write_mrc(tmp_path / "n.mrc", data, 10.0)) as mrc:
        assert np.isnan(mrc.header.dmean) and np.isnan(mrc.data[0, 0, 0])


def test_writing_makes_no_full_size_temporary(tmp_path):
    import threading
    import tracemalloc

    import psutil

    data = np.ones((64, 1024, 1024), np.uint16)  # 128 MiB; statistics in float would need 256-512 MiB
    proc, rss, done = psutil.Process(), [], threading.Event()
    start = proc.memory_info().rss

    def watch() -> None:  # the written file's pages must not pile up in this process either
        while not done.wait(0.002):
            rss.append(proc.memory_info().rss)

    watcher = threading.Thread(target=watch)
    tracemalloc.start()
    watcher.start()
    try:
        write_mrc(tmp_path / "big.mrc", data, 10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        done.set()
        watcher.join()
        tracemalloc.stop()
    assert peak < 0.75 * data.nbytes
    assert max(rss) - start < 0.75 * data.nbytes
