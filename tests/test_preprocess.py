"""Resampling (alignment, anti-aliasing, streaming), normalisation and polarity detection."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import cryoves.preprocess as pp
from _predict_utils import HIV_TIF, vesicle_volume
from cryoves.errors import InputError, ParameterError
from cryoves.io import Tomogram
from cryoves.preprocess import (
    detect_polarity,
    from_model_grid,
    model_grid_scale,
    normalise,
    resample,
    to_model_grid,
)


def _blob(shape, centre, sigma=2.5):
    idx = np.indices(shape, dtype=np.float64)
    d2 = sum((i - c) ** 2 for i, c in zip(idx, centre, strict=True))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def _centroid(v):
    return np.array(ndimage.center_of_mass(np.asarray(v, dtype=np.float64)))


@pytest.mark.parametrize("target", [(20, 25, 30), (80, 100, 120), (33, 50, 71)])
def test_resample_matches_skimage_resize(target):
    from skimage.transform import resize

    a = np.random.default_rng(0).normal(size=(40, 50, 60)).astype(np.float32)
    ours = resample(a, target)
    ref = resize(a, target, order=1, anti_aliasing=True, mode="edge")
    assert ours.dtype == np.float32 and ours.shape == target
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def _resample_reference(a, target, order, antialias):
    """Per axis: scipy's Gaussian of σ = (n/m − 1)/2 where the axis shrinks, then sampling at the
    aligned coordinates (linear, edge values beyond the ends; or nearest)."""
    out = a.astype(np.float64)
    for axis, m in enumerate(target):
        n = out.shape[axis]
        if n == m:
            continue
        if antialias and order == 1 and m < n:
            out = ndimage.gaussian_filter1d(out, (n / m - 1) / 2, axis=axis, mode="nearest")
        c = pp._axis_coords(n, m)
        if order == 0:
            out = np.take(out, np.clip(np.floor(c + 0.5), 0, n - 1).astype(int), axis=axis)
            continue
        x = np.clip(c, 0, n - 1)
        i0 = np.clip(np.floor(x), 0, max(n - 2, 0)).astype(int)
        w = (x - i0).astype(np.float32).astype(np.float64).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, np.minimum(i0 + 1, n - 1), axis=axis) * w
    return out


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("antialias", [True, False])
def test_resample_windows_equal_filter_then_interpolate(order, antialias):
    """The compiled windowed resampling is the Gaussian-then-interpolation of scipy it replaced:
    shrinking and enlarging axes mixed, one-voxel axes, factors whose Gaussian is wider than the
    axis; nearest sampling exactly, linear within float32 rounding."""
    rng = np.random.default_rng(7)
    for shape, target in [((30, 41, 57), (11, 60, 19)), ((1, 9, 40), (3, 2, 9)), ((25, 1, 12), (7, 4, 12)),
                          ((64, 33, 20), (13, 33, 7)), ((5, 6, 7), (40, 3, 7))]:
        a = rng.normal(size=shape).astype(np.float32)
        got = resample(a, target, order=order, antialias=antialias)
        ref = _resample_reference(a, target, order, antialias)
        assert got.shape == target and got.dtype == np.float32
        if order == 0:
            np.testing.assert_array_equal(got, ref.astype(np.float32))
        else:
            np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


def test_resample_centre_alignment_and_round_trip():
    shape = (40, 48, 56)
    centre = (17.3, 24.6, 30.2)
    v = _blob(shape, centre)
    for f in (0.55, 0.668, 1.7):
        down, scale = to_model_grid(Tomogram(v, (10.0, 10.0, 10.0)), 10.0 / f)
        expected = [(c + 0.5) * s - 0.5 for c, s in zip(centre, scale, strict=True)]
        np.testing.assert_allclose(_centroid(down), expected, atol=0.05)
        back = from_model_grid(down, shape)
        assert back.shape == shape
        np.testing.assert_allclose(_centroid(back), centre, atol=0.05)


def test_resample_streams_in_chunks_into_a_memmap(tmp_path, monkeypatch):
    a = np.random.default_rng(1).normal(size=(30, 20, 24)).astype(np.float32)
    src = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=a.shape)
    src[:] = a
    whole = resample(a, 0.37)
    monkeypatch.setattr(pp, "_CHUNK_VOXELS", 2000)  # a few planes per chunk
    out = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.float32, shape=whole.shape)
    got = resample(src, 0.37, out=out)
    assert got is out
    np.testing.assert_array_equal(np.asarray(out), whole)


def test_resample_antialias_removes_aliasing():
    z = np.arange(66)  # shrinking ×3 samples the Nyquist stripes on whole voxels
    stripes = np.broadcast_to(np.where(z % 2 == 0, 1.0, -1.0)[:, None, None], (66, 8, 8)).astype(np.float32)
    inner = slice(2, -2)  # the edge value is repeated beyond the ends, which breaks the pattern
    assert np.abs(resample(stripes, (22, 8, 8))[inner]).max() < 0.05
    assert np.abs(resample(stripes, (22, 8, 8), antialias=False)[inner]).max() > 0.5


def test_resample_nearest_and_bad_arguments():
    a = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    up = resample(a, 2.0, order=0)
    np.testing.assert_array_equal(up[::2, ::2, ::2], a)
    with pytest.raises(ParameterError):
        resample(a, 0.5, order=3)
    with pytest.raises(ParameterError):
        resample(a, -1.0)


def test_model_grid_scale_with_vesicle_radius_hint():
    assert model_grid_scale(14.69, 22.0) == pytest.approx((14.69 / 22,) * 3)
    # 60 nm vesicles at 40 Å shrink so they look like 19 nm training vesicles
    assert model_grid_scale(40.0, 22.0, 60.0, 19.0)[2] == pytest.approx(40 / 22 * 19 / 60)
    with pytest.raises(ParameterError):
        model_grid_scale(10.0, 22.0, -5.0)
    tomo = Tomogram(np.zeros((20, 40, 40), np.float32), (40.0, 40.0, 40.0))
    arr, scale = to_model_grid(tomo, 22.0, vesicle_radius_nm=60.0, training_radius_nm=19.0)
    assert arr.shape == tuple(round(s * 40 / 22 * 19 / 60) for s in tomo.shape)
    assert scale == pytest.approx([m / n for m, n in zip(arr.shape, tomo.shape, strict=True)])


def test_normalise_zscore_and_robust():
    rng = np.random.default_rng(2)
    v = rng.normal(5.0, 2.0, size=(32, 32, 32)).astype(np.float32)
    z = normalise(v, "zscore")
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert v.mean() > 4  # input untouched
    spiked = v.copy()
    spiked.flat[rng.choice(v.size, 50, replace=False)] = -1e4  # gold beads
    robust = normalise(spiked, "robust_zscore")
    plain = normalise(spiked, "zscore")
    clean = normalise(v, "robust_zscore")
    mask = (spiked == v) & (np.abs(clean) < 2)  # the clipped tails move with the percentiles
    assert np.abs(robust[mask] - clean[mask]).max() < 0.05
    assert np.abs(plain[mask] - clean[mask]).max() > 0.5
    with pytest.raises(ParameterError):
        normalise(v, "minmax")
    with pytest.raises(InputError):
        normalise(np.ones((4, 4, 4), np.float32), "zscore")


@pytest.mark.parametrize("seed,noise", [(0, 0.5), (1, 1.0), (2, 1.5)])
def test_detect_polarity_on_synthetic_both_ways(seed, noise):
    v = vesicle_volume(seed=seed, noise=noise)
    label, score = detect_polarity(v)
    assert label == "dense_dark" and score > 0
    label, score_inv = detect_polarity(-v)
    assert label == "dense_bright" and score_inv == pytest.approx(-score)


@pytest.mark.parametrize("ice_nm", [None, 60.0, 110.0])
def test_detect_polarity_on_simulated_tomogram(ice_nm):
    """Also with vacuum slabs above/below thin ice (141 nm box), which fooled an unfiltered skewness."""
    simulate = pytest.importorskip("cryoves.simulate")
    cfg = simulate.SimulationConfig.preset("small")
    if ice_nm is not None:
        cfg = cfg.replace(ice_thickness_nm=ice_nm)
    sim = simulate.simulate(cfg, seed=0)
    data = np.asarray(sim.tomogram.data, dtype=np.float32)
    f = sim.tomogram.voxel_size_a / 22.0
    data = resample(data, f)
    assert detect_polarity(data)[0] == "dense_dark"
    assert detect_polarity(-data)[0] == "dense_bright"


@pytest.mark.skipif(not HIV_TIF.exists(), reason="HIV-1 VLP reference tomogram absent")
def test_detect_polarity_on_real_hiv_tomogram():
    import tifffile

    t = tifffile.imread(HIV_TIF).astype(np.float32)  # dense = bright, 40 Å/voxel
    for f in (1.0, 40 / 22, 40 / 22 * 19 / 60):
        v = t if f == 1.0 else resample(t, f)
        label, score = detect_polarity(v)
        assert label == "dense_bright", (f, score)
        assert detect_polarity(-v)[0] == "dense_dark"


def _vesicle_z_extent(sim) -> tuple[float, float]:
    c, r = sim.vesicles.centres, sim.vesicles.radii
    return float((c[:, 0] - r).min()), float((c[:, 0] + r).max())


@pytest.mark.parametrize("seed", [11, 12])
def test_specimen_slab_skips_the_vacuum_and_keeps_every_vesicle(seed):
    from _sim_utils import slab_sim

    sim = slab_sim(seed)
    vol = sim.tomogram.asarray()
    zs = pp.specimen_slab(vol, margin=8)
    lo, hi = _vesicle_z_extent(sim)
    assert zs.start <= lo and zs.stop >= hi  # nothing of a vesicle is skipped
    assert zs.stop - zs.start <= 0.75 * vol.shape[0]  # a quarter or more is vacuum, and skipped


def test_specimen_slab_tilted_slab_keeps_every_vesicle():
    """A slab tilted across x (20 slices from one side to the other): found block by block."""
    from _sim_utils import slab_sim

    sim = slab_sim(11)
    vol = sim.tomogram.asarray()
    shift = np.round(np.linspace(0, 20, vol.shape[2])).astype(int)
    tilted = np.stack([np.roll(vol[:, :, x], shift[x], axis=0) for x in range(vol.shape[2])], axis=2)
    zs = pp.specimen_slab(tilted, margin=8)
    c, r = sim.vesicles.centres, sim.vesicles.radii
    z = c[:, 0] + shift[np.clip(np.round(c[:, 2]).astype(int), 0, vol.shape[2] - 1)]
    assert zs.start <= (z - r).min() and zs.stop >= (z + r).max()


def test_specimen_slab_trims_nothing_without_clear_vacuum():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(96, 64, 64)).astype(np.float32)
    assert pp.specimen_slab(noise) == slice(0, 96)
    assert pp.specimen_slab(noise[:20]) == slice(0, 20)  # too thin to judge
    from _sim_utils import slab_sim

    full = slab_sim(13, ice_nm=None, shape=(64, 96, 96), voxel_size_a=22.0).tomogram.asarray()  # ice fills 90 %
    zs = pp.specimen_slab(full, margin=8)
    assert zs.stop - zs.start >= 0.9 * full.shape[0]


@pytest.mark.parametrize("dtype", [np.int16, np.float64])
@pytest.mark.parametrize("invert", [True, False])
@pytest.mark.parametrize("method", ["robust_zscore", "zscore", "none"])
def test_network_input_on_its_own_grid_is_copy_invert_normalise_in_one_pass(dtype, invert, method):
    """A tomogram already at the model voxel size is copied, inverted and normalised slab by slab
    in one pass: the numbers of copying it, negating the copy and normalising it."""
    from types import SimpleNamespace

    from cryoves.preprocess import prepare_input

    v = (np.random.default_rng(2).normal(size=(37, 40, 45)) * 300).astype(dtype)
    info = SimpleNamespace(voxel_size_a=10.0, vesicle_radius_nm=19.0, polarity="dense_dark", prefilter_sigma=0.0,
                           normalisation=method)
    out = np.empty(v.shape, np.float32)
    grid, how = prepare_input(Tomogram(v, (10.0,) * 3), info, invert=invert, out=out)
    ref = np.asarray(v, dtype=np.float32)
    ref = -ref if invert else ref
    assert grid is out and how["inverted"] is invert and how["scale"] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(grid, normalise(ref, method))
