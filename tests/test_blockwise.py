"""One tomogram split across a 2-worker LocalCluster: blockwise prediction and sphere fitting equal
the single-process results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _post_utils import random_scene
from _predict_utils import random_model, vesicle_volume
from cryoves.blockwise import auto_block, fit_spheres_blockwise, plan_blocks, predict_blockwise
from cryoves.errors import OutputExistsError, ParameterError
from cryoves.io import write_mrc
from cryoves.io.tomogram import Tomogram
from cryoves.pipeline import SegmentConfig, segment
from cryoves.postprocess import fit_spheres, label_vesicles
from cryoves.predict import plan_tiles, predict_tomogram

distributed = pytest.importorskip("distributed")

TILE = 64  # smallest tile the default context (24) allows: many tiles on a small volume


@pytest.fixture(scope="module")
def model():
    return random_model(0)


def test_plan_blocks_partitions_the_single_process_tiles():
    shape = (70, 150, 131)
    tiles = plan_tiles(shape, TILE)
    blocks = plan_blocks(shape, (30, 64, 50), TILE)
    assert len(blocks) >= 8
    cover = np.zeros(shape, np.int32)
    for b in blocks:
        cover[b.keep] += 1
        for t in b.tiles:
            assert all(bs.start <= ts.start and ts.stop <= bs.stop for bs, ts in zip(b.src, t.src))
            assert all(bk.start <= tk.start and tk.stop <= bk.stop for bk, tk in zip(b.keep, t.keep))
    assert (cover == 1).all()
    got = sorted((tuple((s.start, s.stop) for s in t.src), tuple((s.start, s.stop) for s in t.keep))
                 for b in blocks for t in b.tiles)
    want = sorted((tuple((s.start, s.stop) for s in t.src), tuple((s.start, s.stop) for s in t.keep)) for t in tiles)
    assert got == want
    with pytest.raises(ParameterError):
        plan_blocks(shape, (0, 64, 64), TILE)
    # automatic block size: enough blocks for the workers, one block for one worker
    assert len(plan_blocks(shape, auto_block(shape, TILE, None, 6), TILE)) >= 6
    assert len(plan_blocks(shape, auto_block(shape, TILE, None, 1), TILE)) == 1


def test_predict_blockwise_equals_single_process(client, model, tmp_path):
    # 33 Å voxels -> resampled 1.5x onto the 22 Å model grid (48 x 96 x 84), split into 1 x 2 x 2 blocks
    tomo = Tomogram(vesicle_volume((32, 64, 56), n=5, seed=1), (33.0,) * 3)
    single = predict_tomogram(tomo, model, device="cpu", tile=TILE, progress=False)
    res = predict_blockwise(tomo, model, client, block=(48, 48, 48), out=tmp_path / "p.zarr", device="cpu",
                            tile=TILE, progress=False)
    # blocks hold cubic tiles (more of them to spread); one process shapes its tiles to the volume:
    # tiling is exact, so the maps agree all the same
    assert res.info["blocks"] >= 4 and res.info["tiles"] > single.info["tiles"]
    assert res.info["inverted"] == single.info["inverted"]
    blockwise = np.asarray(res.prob[...])
    assert blockwise.shape == tomo.shape and (tmp_path / "p.zarr").is_dir()
    # not bit-identical only because oneDNN rounds differently with 1 (worker) vs 2 (single) threads
    assert single.prob.std() > 1e-3  # a map with structure, not a constant
    np.testing.assert_allclose(blockwise, single.prob, atol=1e-6, rtol=0)
    assert not any(p.name.startswith(".cryoves-blockwise") for p in tmp_path.iterdir())  # scratch removed
    with pytest.raises(OutputExistsError):
        predict_blockwise(tomo, model, client, out=tmp_path / "p.zarr", device="cpu", tile=TILE, progress=False)


def test_predict_blockwise_skips_the_same_vacuum(client, model):
    """A synapse in a thin slab: the blocks cover only the slab, as the single-process tiles do."""
    from _sim_utils import slab_sim

    tomo = slab_sim(11, shape=(128, 96, 96)).tomogram  # 384 nm box, 120 nm of ice
    kw = dict(device="cpu", tile=TILE, progress=False, precision="fp32")
    single = predict_tomogram(tomo, model, **kw)
    res = predict_blockwise(tomo, model, client, block=(48, 48, 48), **kw)
    (z0, z1), *_ = single.info["network_box"]
    assert res.info["network_box"] == single.info["network_box"] and z1 - z0 < single.info["model_grid_shape"][0]
    assert res.info["blocks"] >= 4
    np.testing.assert_allclose(np.asarray(res.prob), single.prob, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def scene():
    s = random_scene(n=12, shape=(48, 112, 112), seed=3)
    labels, _ = label_vesicles(s.prob, 0.5, s.voxel_size, min_radius_nm=4)
    return s, labels


def _same_result(got, want):
    pd.testing.assert_frame_equal(got[0].df, want[0].df, check_exact=True)
    pd.testing.assert_frame_equal(got[1].reset_index(drop=True), want[1].reset_index(drop=True), check_exact=True)


def test_fit_spheres_blockwise_equals_single_process(client, scene, caplog):
    s, labels = scene
    want = fit_spheres(s.intensity, labels, s.voxel_size)
    assert len(want[0]) >= 8
    with caplog.at_level("INFO", logger="cryoves.blockwise"):
        got = fit_spheres_blockwise(s.intensity, labels, s.voxel_size, client, block=(48, 56, 56))
    _same_result(got, want)
    assert "beyond their block's halo" not in caplog.text  # every vesicle was fitted on a worker


def test_fit_spheres_blockwise_too_small_halo_falls_back_to_the_client(client, scene, caplog):
    s, labels = scene
    want = fit_spheres(s.intensity, labels, s.voxel_size, mask_neighbours=False)
    with caplog.at_level("INFO", logger="cryoves.blockwise"):
        got = fit_spheres_blockwise(s.intensity, labels, s.voxel_size, client, block=(24, 24, 24), halo=2,
                                    mask_neighbours=False)
    _same_result(got, want)
    assert "beyond their block's halo" in caplog.text


def test_segment_with_client_fits_blockwise(client, scene, tmp_path, monkeypatch):
    import cryoves.blockwise as bw

    s, _ = scene
    write_mrc(tmp_path / "prob.mrc", s.prob, s.voxel_size)
    tomo = Tomogram(s.intensity, (s.voxel_size,) * 3)
    cfg = SegmentConfig(from_probability=str(tmp_path / "prob.mrc"), report=False, radius_range_nm=(4.0, 90.0))
    calls = []
    real = bw.fit_spheres_blockwise
    monkeypatch.setattr(bw, "fit_spheres_blockwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = segment(tomo, None, cfg, backend=bw.DaskBackend(client))
    want = segment(tomo, None, cfg)
    assert calls == [1] and len(want.vesicles) >= 8
    pd.testing.assert_frame_equal(got.vesicles.df, want.vesicles.df, check_exact=True)
    np.testing.assert_array_equal(got.labels, want.labels)


def test_segment_split_rejects_zero_workers(tmp_path):
    from cryoves.blockwise import segment_split

    with pytest.raises(ParameterError, match="--workers"):
        segment_split(tmp_path / "t.mrc", tmp_path / "out", workers=0)
