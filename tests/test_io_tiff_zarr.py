"""TIFF and OME-Zarr round trips, metadata units, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cryoves.errors import InputError, VoxelSizeError
from cryoves.io import read_tomogram, tomogram_info
from cryoves.io.tiff import read_tiff, write_tiff
from cryoves.io.zarr import read_ome_zarr, write_ome_zarr

RNG = np.random.default_rng(3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("nz", [3, 5])
def test_tiff_roundtrip(tmp_path, dtype, nz):
    data = (RNG.normal(size=(nz, 6, 7)) * 20).astype(dtype)
    p = write_tiff(tmp_path / "a.tif", data, (20.0, 14.69, 14.69))
    t = read_tomogram(p)
    assert t.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(t.data), data)
    np.testing.assert_allclose(t.voxel_size, (20.0, 14.69, 14.69), rtol=1e-5)


def test_imagej_tiff_in_microns(tmp_path):
    data = RNG.integers(0, 255, size=(4, 5, 6)).astype(np.uint8)
    p = tmp_path / "fiji.tif"
    tifffile.imwrite(p, data, imagej=True, resolution=(1 / 0.0022, 1 / 0.0022),
                     metadata={"axes": "ZYX", "spacing": 0.0022, "unit": "micron"})
    t = read_tiff(p)
    np.testing.assert_allclose(t.voxel_size, (22.0, 22.0, 22.0), rtol=1e-4)
    assert isinstance(t.data, np.memmap)  # uncompressed: memory-mapped


def test_compressed_tiff_is_read(tmp_path):
    data = RNG.integers(0, 1000, size=(4, 5, 6)).astype(np.uint16)
    p = write_tiff(tmp_path / "c.tif", data, 10.0, compression="zlib")
    np.testing.assert_array_equal(np.asarray(read_tiff(p).data), data)


def test_tiff_without_voxel_size_needs_override(tmp_path):
    p = tmp_path / "plain.tif"
    data = np.ones((3, 4, 5), np.float32)
    tifffile.imwrite(p, data, photometric="minisblack")
    with pytest.raises(VoxelSizeError, match="--voxel-size"):
        read_tiff(p)
    assert read_tiff(p, voxel_size=8.0).voxel_size == (8.0, 8.0, 8.0)
    info = tomogram_info(p)
    assert any("no voxel size" in q for q in info["problems"])


def test_tiff_2d_rejected(tmp_path):
    p = tmp_path / "img.tif"
    tifffile.imwrite(p, np.zeros((4, 5), np.float32))
    with pytest.raises(InputError, match="2-D"):
        read_tiff(p, voxel_size=10.0)


def test_tiff_nan_rejected(tmp_path):
    data = np.ones((3, 4, 5), np.float32)
    data[1, 2, 3] = np.nan
    p = write_tiff(tmp_path / "n.tif", data, 10.0)
    with pytest.raises(InputError, match="NaN"):
        read_tiff(p)


@pytest.mark.parametrize("unit", ["angstrom", "nanometer"])
def test_ome_zarr_roundtrip(tmp_path, unit):
    data = RNG.normal(size=(6, 7, 9)).astype(np.float32)
    p = write_ome_zarr(tmp_path / "t.zarr", data, (22.0, 11.0, 11.0), origin=(0.0, 5.0, 10.0),
                       unit=unit, chunks=(4, 4, 4))
    attrs = json.loads((p / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["unit"] for a in ms["axes"]] == [unit] * 3
    t = read_tomogram(p)
    assert not isinstance(t.data, np.ndarray)  # lazy
    np.testing.assert_array_equal(np.asarray(t.data), data)
    np.testing.assert_allclose(t.voxel_size, (22.0, 11.0, 11.0))
    np.testing.assert_allclose(t.origin, (0.0, 5.0, 10.0))


def _write_ngff(path, data, axes, scale):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    a = g.create_array("s0", shape=data.shape, dtype=data.dtype)
    a[...] = data
    g.attrs["multiscales"] = [{
        "version": "0.4", "axes": axes,
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(scale)}],
    }]


def test_ome_zarr_with_channel_axis_and_micrometres(tmp_path):
    data = RNG.normal(size=(1, 4, 5, 6)).astype(np.float32)
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    _write_ngff(tmp_path / "c.zarr", data, axes, [1.0, 0.003, 0.0015, 0.0015])
    t = read_ome_zarr(tmp_path / "c.zarr")
    assert t.shape == (4, 5, 6)
    np.testing.assert_allclose(t.voxel_size, (30.0, 15.0, 15.0))
    np.testing.assert_array_equal(np.asarray(t.data[1:3]), data[0, 1:3])
    np.testing.assert_array_equal(np.asarray(t.data), data[0])


def test_ome_zarr_without_units_needs_override(tmp_path):
    data = np.ones((3, 4, 5), np.float32)
    _write_ngff(tmp_path / "u.zarr", data, [{"name": a, "type": "space"} for a in "zyx"], [1.0, 1.0, 1.0])
    with pytest.raises(VoxelSizeError, match="--voxel-size"):
        read_ome_zarr(tmp_path / "u.zarr")
    assert read_ome_zarr(tmp_path / "u.zarr", voxel_size=12.0).voxel_size == (12.0, 12.0, 12.0)


def test_zarr_folder_without_metadata(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "x.zarr"), mode="w", zarr_format=2)
    from cryoves.errors import FormatError

    with pytest.raises(FormatError, match="multiscales"):
        read_tomogram(tmp_path / "x.zarr")


def test_write_ome_zarr_failure_leaves_nothing(tmp_path):
    with pytest.raises(InputError):
        write_ome_zarr(tmp_path / "bad.zarr", np.zeros((3, 4)), 10.0)
    assert list(tmp_path.iterdir()) == []


def test_damaged_tiff(tmp_path):
    from cryoves.errors import FormatError

    p = write_tiff(tmp_path / "d.tif", np.ones((3, 4, 5), np.float32), 10.0)
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(FormatError, match="not a readable TIFF"):
        read_tiff(tmp_path / "junk.tif")
    assert read_tiff(p).shape == (3, 4, 5)


def test_ome_zarr_overwrite_is_atomic(tmp_path):
    p = write_ome_zarr(tmp_path / "t.zarr", np.zeros((3, 4, 5), np.uint16), 10.0)
    write_ome_zarr(p, np.ones((3, 4, 6), np.uint16), 12.0)
    t = read_ome_zarr(p)
    assert t.shape == (3, 4, 6) and t.voxel_size == (12.0, 12.0, 12.0)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.zarr"]
