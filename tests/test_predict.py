"""Tiled prediction: exact stitching, TTA, polarity, outputs, memory bounds, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from _predict_utils import HIV_TIF, PARITY_NPZ, WEIGHTS_H5, random_model, random_net, vesicle_volume
from cryoves.errors import OutputExistsError, ParameterError, ResourceError
from cryoves.io import Tomogram, write_mrc
from cryoves.model import ModelInfo, save_checkpoint
from cryoves.predict import (
    DEFAULT_CONTEXT,
    TTA_TRANSFORMS,
    _inverse,
    _transform,
    plan_axis,
    plan_tiles,
    predict_array,
    predict_tomogram,
    tile_shape,
)


def _whole(net, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(x)[None, None])[0, 0].numpy()


@pytest.mark.parametrize("length", [1, 37, 64, 100, 257])
@pytest.mark.parametrize("tile", [56, 96])
def test_plan_axis_partitions_and_aligns(length, tile):
    plan = plan_axis(length, tile, 24)
    kept = [(a, b) for _, _, a, b in plan]
    assert kept[0][0] == 0 and kept[-1][1] == length
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(kept[:-1], kept[1:], strict=True))
    for lo, hi, a, b in plan:
        assert lo % 4 == 0 and hi % 4 == 0 and hi - lo <= max(tile, -(-length // 4) * 4)
        assert lo == 0 or a - lo >= 24  # full context on inner sides
        assert hi >= min(b + 24, -(-length // 4) * 4)
    with pytest.raises(ParameterError):
        plan_axis(100, 50, 24)


def test_tiled_prediction_equals_whole_volume_forward():
    net = random_net(0, base_filters=4)  # same topology and receptive field, 16× cheaper
    x = vesicle_volume((60, 64, 68), seed=1)
    x = (x - x.mean()) / x.std()
    whole = _whole(net, x)  # sizes are multiples of 4, so the whole forward pass is defined
    stats: dict = {}
    tiled = predict_array(net, x, tile=56, progress=False, stats=stats)
    assert stats["tiles"] >= 4 and stats["tile_shape"] != [56, 56, 56]  # not cubes: fewer input voxels
    np.testing.assert_allclose(tiled, whole, atol=2e-5)


@pytest.mark.parametrize("shape,tile", [((211, 400, 400), 160), ((60, 64, 68), 56), ((300, 300, 300), 96),
                                        ((100, 50, 800), 60), ((30, 30, 30), 160)])
def test_tile_shape_needs_fewer_input_voxels_in_the_same_memory(shape, tile):
    sides = tile_shape(shape, tile)
    tiles, cubes = plan_tiles(shape, sides), plan_tiles(shape, tile)
    assert max(int(np.prod(t.shape)) for t in tiles) <= tile**3  # the memory of a tile³ cube
    assert sum(int(np.prod(t.shape)) for t in tiles) <= sum(int(np.prod(t.shape)) for t in cubes)
    covered = np.zeros(shape, np.uint8)
    for t in tiles:
        covered[t.keep] += 1
    assert (covered == 1).all()
    if shape == (211, 400, 400):  # a slab: one tile deep, 18 % less input than 160³ cubes
        assert sides[0] == 212
        assert sum(int(np.prod(t.shape)) for t in tiles) < 0.85 * sum(int(np.prod(t.shape)) for t in cubes)


def test_prediction_is_shift_equivariant_away_from_borders():
    net = random_net(1, base_filters=4)
    x = vesicle_volume((64, 64, 64), seed=2)
    shifted = np.roll(x, (8, -12, 4), axis=(0, 1, 2))
    p = predict_array(net, x, tile=56, progress=False)
    q = predict_array(net, shifted, tile=56, progress=False)
    q_back = np.roll(q, (-8, 12, -4), axis=(0, 1, 2))
    inner = (slice(28, 36),) * 3  # ≥ 24 voxels (receptive field) from every border and wrap
    np.testing.assert_allclose(p[inner], q_back[inner], atol=2e-5)


@pytest.mark.skipif(not (WEIGHTS_H5.exists() and PARITY_NPZ.exists()), reason="reference files absent")
def test_tiled_prediction_matches_original_keras_output():
    from cryoves.model import load_model

    net = load_model(WEIGHTS_H5).net
    ref = np.load(PARITY_NPZ)
    p = predict_array(net, ref["input_96"], tile=72, progress=False)  # 8 tiles
    assert np.abs(p - ref["prob_96"]).max() <= 1e-4


def test_tta_transforms_keep_z_and_invert():
    x = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 1, 4, 6, 8)
    seen = set()
    for t in TTA_TRANSFORMS:
        y = _transform(x, *t)
        assert y.shape[2] == 4  # z never swapped with y/x
        assert torch.equal(_inverse(y, *t), x)
        # each z plane stays a z plane (same set of values per plane)
        assert [set(y[0, 0, k].flatten().tolist()) for k in range(4)] in (
            [set(x[0, 0, k].flatten().tolist()) for k in range(4)],
            [set(x[0, 0, 3 - k].flatten().tolist()) for k in range(4)],
        )
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) == len(TTA_TRANSFORMS)  # all distinct


def test_tta_merges_by_mean_of_logits():
    net = random_net(2)
    x = vesicle_volume((32, 40, 40), seed=3)
    got = predict_array(net, x, tile=64, tta=3, progress=False)
    with torch.inference_mode():
        xt = torch.from_numpy(x)[None, None]
        logits = [_inverse(net.forward_logits(_transform(xt, *t)), *t) for t in TTA_TRANSFORMS[:3]]
        ref = torch.sigmoid(torch.stack(logits).mean(0))[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)
    with pytest.raises(ParameterError):
        predict_array(net, x, tta=17, progress=False)


def test_bf16_is_close_to_fp32():
    net = random_net(3)
    x = vesicle_volume((32, 32, 32), seed=4)
    a = predict_array(net, x, tile=64, precision="fp32", progress=False)
    b = predict_array(net, x, tile=64, precision="bf16", progress=False)
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.05


def test_resource_error_before_starting(monkeypatch):
    import cryoves.predict as pr

    monkeypatch.setattr(pr, "available_memory", lambda device: 64 * 2**20)
    with pytest.raises(ResourceError, match="--tile"):
        predict_array(random_net(0), np.zeros((8, 8, 8), np.float32), tile=256, progress=False)


_KEEP_PROBE = textwrap.dedent("""
    import json, os, resource, torch
    from cryoves._malloc import _LIBC, keep_freed_memory, not_in_this_thread

    block = 64 * 2**20  # above glibc's largest mmap threshold: mapped afresh on every allocation

    def loop():
        for _ in range(24):
            torch.ones(block // 4, dtype=torch.float32).sum()

    def faults(fn):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    out = {"glibc": _LIBC is not None, "block": block, "plain": faults(loop), "rss_before": rss()}
    with keep_freed_memory(2 * block):
        out["kept"] = faults(loop)
    out["rss_after"] = rss()
    with keep_freed_memory(2 * block):
        with keep_freed_memory(2**20):  # e.g. another thread's prediction, ending first
            pass
        out["still"] = faults(loop)
    with not_in_this_thread(), keep_freed_memory(2 * block):  # work beside the main thread's
        out["off"] = faults(loop)
    print(json.dumps(out))
""")


def test_keep_freed_memory_maps_repeated_large_blocks_once():
    # a fresh interpreter: no other test's thread holds the allocator's settings meanwhile
    r = subprocess.run([sys.executable, "-c", _KEEP_PROBE], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["glibc"]:
        pytest.skip("glibc only")
    # fault counts depend on the page size the kernel gives (4 KiB, or 2 MiB transparent huge
    # pages), so compare the loops: the plain one faults all 24 blocks in again, the kept one a
    # few (measured: 3)
    assert out["plain"] >= 24
    assert 4 * out["kept"] < out["plain"]
    assert out["rss_after"] < out["rss_before"] + out["block"] // 2  # given back after the block
    assert 4 * out["still"] < out["plain"]  # kept until the last block ends
    assert out["off"] > 4 * out["kept"]  # nothing kept in a thread that works beside another


def test_prediction_on_the_cpu_keeps_one_tile_of_activations(monkeypatch):
    import contextlib

    import cryoves.predict as pr

    kept = []
    monkeypatch.setattr(pr, "keep_freed_memory", lambda n: kept.append(n) or contextlib.nullcontext())
    stats = {}
    predict_array(random_net(0), np.zeros((24, 40, 48), np.float32), tile=64, precision="fp32", progress=False,
                  stats=stats)
    batch = min(stats["batch_size"], stats["tiles"])
    assert kept == [pr.estimate_tile_memory(stats["tile_shape"], batch, "fp32")] and kept[0] > 0



def test_tiles_follow_the_networks_width():
    """A narrower U-Net holds fewer bytes per tile voxel: within the same memory budget it gets
    larger tiles (less overlap to compute), and the memory kept between tiles follows."""
    import cryoves.predict as pr

    assert pr.estimate_tile_memory(100, 1, "bf16") == 100**3 * pr.BYTES_PER_TILE_VOXEL["bf16"]
    assert pr.estimate_tile_memory(100, 1, "bf16", 8) < 0.7 * pr.estimate_tile_memory(100, 1, "bf16")
    tiles = {}
    for filters in (4, 16):
        stats = {}
        net = random_net(0, base_filters=filters)
        assert pr.network_filters(pr.prepare_network(net, torch.device("cpu"), "fp32")) == filters
        predict_array(net, np.zeros((24, 40, 48), np.float32), precision="fp32", progress=False, stats=stats,
                      memory_budget=64 * 2**20)
        tiles[filters] = stats["tile"]
    assert tiles[16] == pr.choose_tile(64 * 2**20, "fp32") and tiles[4] > tiles[16] + 8



def _tomo(dark=True, shape=(40, 48, 56), vs=22.0):
    return Tomogram(vesicle_volume(shape, seed=5, dark=dark), (vs, vs, vs))


def test_predict_tomogram_grid_polarity_and_info():
    model = random_model(0)
    dark = predict_tomogram(_tomo(dark=True, vs=18.0), model, progress=False)
    assert dark.prob.shape == (40, 48, 56) and dark.prob.dtype == np.float32
    assert 0 <= dark.prob.min() and dark.prob.max() <= 1
    assert dark.info["inverted"] is False and dark.info["polarity"] == "dense_dark"
    assert dark.info["scale"] == pytest.approx([m / n for m, n in zip(dark.info["model_grid_shape"], (40, 48, 56), strict=True)])
    for key in ("model", "sha256", "model_voxel_size_a", "tiles", "seconds", "precision", "polarity_score"):
        assert key in dark.info
    bright = predict_tomogram(_tomo(dark=False, vs=18.0), model, progress=False)
    assert bright.info["inverted"] is True
    np.testing.assert_allclose(bright.prob, dark.prob, atol=1e-5)  # detected and undone
    forced = predict_tomogram(_tomo(dark=False, vs=18.0), model, invert=False, progress=False)
    assert forced.info["inverted"] is False and np.abs(forced.prob - dark.prob).max() > 1e-3
    # a given inversion is not second-guessed: the polarity follows from it, no score is measured
    assert forced.info["polarity"] == "dense_dark" and forced.info["polarity_score"] is None
    given = predict_tomogram(_tomo(dark=False, vs=18.0), model, invert=True, progress=False)
    assert given.info["polarity"] == "dense_bright" and given.info["polarity_score"] is None
    np.testing.assert_allclose(given.prob, dark.prob, atol=1e-5)


def test_a_given_inversion_skips_the_polarity_detection(monkeypatch):
    import cryoves.preprocess as pp

    monkeypatch.setattr(pp, "detect_polarity", lambda *a, **k: pytest.fail("polarity detected although given"))
    for vs in (18.0, 22.0):  # resampled, and on the model's own grid
        res = predict_tomogram(_tomo(dark=False, vs=vs), random_model(0), invert=True, progress=False)
        assert res.info["inverted"] is True and res.info["polarity_score"] is None


def test_predict_tomogram_writes_mrc_memmap(tmp_path):
    model = random_model(1)
    tomo = _tomo(vs=30.0)
    tomo.origin = (3.0, 2.0, 1.0)
    out = tmp_path / "sub" / "prob.mrc"
    mem = predict_tomogram(tomo, model, progress=False)
    res = predict_tomogram(tomo, model, out=out, progress=False)
    assert isinstance(res.prob, np.memmap)
    np.testing.assert_allclose(np.asarray(res.prob), mem.prob, atol=1e-6)
    import mrcfile

    with mrcfile.open(out) as m:
        assert float(m.voxel_size.x) == pytest.approx(30.0) and float(m.header.origin.z) == pytest.approx(3.0)
        assert float(m.header.dmax) == pytest.approx(float(mem.prob.max()), abs=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no scratch left
    with pytest.raises(OutputExistsError):
        predict_tomogram(tomo, model, out=out, progress=False)
    predict_tomogram(tomo, model, out=out, force=True, progress=False)


@pytest.mark.parametrize("to_file", [False, True], ids=["in_memory", "memory_map"])
def test_bf16_weights_read_a_bf16_copy_of_the_input(monkeypatch, tmp_path, to_file):
    """With bf16 weights the network input is kept as bf16 during the tiles (half the bytes; the
    float32 volume is freed) and gives the same map, bit for bit, as the float32 input converted
    tile by tile; fp32 weights read the float32 input."""
    import contextlib

    import cryoves.predict as pr

    model = random_model(1)
    tomo = _tomo(shape=(40, 96, 104), vs=22.0)  # on the model grid: the map is the network's own
    seen = []
    real = pr.predict_array
    monkeypatch.setattr(pr, "predict_array", lambda net, volume, **kw: seen.append(volume) or real(net, volume, **kw))
    kw = dict(progress=False, tile=56, precision="bf16")
    out = tmp_path / "prob.mrc" if to_file else None
    bf16 = np.array(predict_tomogram(tomo, model, out=out, **kw).prob)
    assert isinstance(seen[-1], torch.Tensor) and seen[-1].dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left
    monkeypatch.setattr(pr, "_bf16_copy", lambda src, folder: contextlib.nullcontext(src))
    per_tile = predict_tomogram(tomo, model, **kw).prob
    assert isinstance(seen[-1], np.ndarray) and seen[-1].dtype == np.float32
    assert np.array_equal(bf16, per_tile)
    predict_tomogram(tomo, model, progress=False, tile=56, precision="fp32")
    assert isinstance(seen[-1], np.ndarray)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    from cryoves.io import Tomogram
    from cryoves.predict import predict_tomogram
    import cryoves.preprocess as pp
    pp._CHUNK_VOXELS = 1 << 20  # 4 MiB resampling chunks
    sys.path.insert(0, sys.argv[3])
    from _predict_utils import random_model

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    n = int(sys.argv[2])
    data = np.lib.format.open_memmap(sys.argv[1] + "/in.npy", mode="w+", dtype=np.float32, shape=(n, n, n))
    rng = np.random.default_rng(0)
    for z in range(n):
        data[z] = rng.normal(size=(n, n))
    data.flush(); del data
    data = np.load(sys.argv[1] + "/in.npy", mmap_mode="r")
    # a tiny net: streaming does not depend on the network size, and it keeps the test fast
    model = random_model(0, depth=1, base_filters=2, convs_per_level=1)
    import torch
    with torch.inference_mode():
        model.net(torch.zeros(1, 1, 96, 96, 96))  # warm up the runtime before the baseline
    base = anon(); peak = [base]; stop = []
    def watch():
        while not stop:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    th = threading.Thread(target=watch); th.start()
    # fp32: bf16 (auto on AMX CPUs) adds oneDNN kernel caches per tile shape, not per volume size
    predict_tomogram(Tomogram(data, (18.0,) * 3), model, out=sys.argv[1] + "/p.npy", tile=96,
                     batch_size=1, progress=False, precision="fp32")
    stop.append(1); th.join()
    print(json.dumps({"base": base, "peak": peak[0], "nbytes": n ** 3 * 4}))
    """
)


@pytest.mark.slow
def test_large_volume_streams_with_bounded_memory(tmp_path):
    """Peak anonymous memory does not grow with the volume: every full-size array (input,
    model-grid scratch, output) is a memory map. The runtime's own caches (~0.2 GiB, the same
    for every size) are cancelled by comparing a small and a large volume."""
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(_MEMORY_SCRIPT)
    growth = {}
    for n in (160, 256):  # both need several tiles (the runtime caches one kernel per shape)
        work = tmp_path / str(n)
        work.mkdir()
        # a fixed mmap threshold: glibc's sliding one keeps freed tile buffers in the heap in an
        # order that depends on the tile shapes (±40 MiB here), which is not what this test is about
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        res = subprocess.run([sys.executable, str(script), str(work), str(n), str(Path(__file__).parent)],
                             capture_output=True, text=True, timeout=110, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        m = json.loads(res.stdout.strip().splitlines()[-1])
        growth[n] = m["peak"] - m["base"]
        out = np.load(work / "p.npy", mmap_mode="r")
        assert out.shape == (n, n, n) and 0 <= float(out[::8, ::8, ::8].min())
    # one extra full float32 copy would add (256³ − 160³)·4 B = 48 MiB
    assert growth[256] - growth[160] < 0.5 * 256**3 * 4, growth


def test_cli_predict_on_mrc(tmp_path):
    from typer.testing import CliRunner

    from cryoves.cli import app

    tomo = _tomo(vs=22.0)
    src = write_mrc(tmp_path / "t.mrc", tomo.data, tomo.voxel_size)
    weights = save_checkpoint(tmp_path / "net.safetensors", random_net(4), ModelInfo(name="net", prefilter_sigma=1.0))
    out = tmp_path / "prob.mrc"
    args = ["predict", str(src), "-o", str(out), "--model", str(weights), "--device", "cpu", "--tta", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    import mrcfile

    with mrcfile.open(out) as m:
        assert m.data.shape == tomo.shape and float(m.voxel_size.x) == pytest.approx(22.0)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output


@pytest.mark.skipif(not (WEIGHTS_H5.exists() and HIV_TIF.exists()), reason="reference files absent")
def test_cli_predict_on_real_hiv_tiff(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cryoves.cli import app

    monkeypatch.setenv("CRYOVES_CRYOVESNET_WEIGHTS", str(WEIGHTS_H5))
    out = tmp_path / "prob.mrc"
    # VLPs are ~60 nm in radius: the hint shrinks them to training size (and keeps the test fast)
    r = CliRunner().invoke(app, ["predict", str(HIV_TIF), "-o", str(out), "--model", "cryovesnet", "--voxel-size", "40",
                                 "--vesicle-radius", "60", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "inverted=True" in r.output  # dense = bright was detected
    import mrcfile

    with mrcfile.open(out) as m:
        assert m.data.shape == (101, 135, 135) and float(m.voxel_size.x) == pytest.approx(40.0)
        assert 0 <= float(m.data.min()) and float(m.data.max()) <= 1


def test_vacuum_above_and_below_the_slab_is_not_predicted():
    """Only the specimen slab goes through the network; inside it (beyond the tiling context of
    the cut) the map is the whole-volume map, outside it is 0."""
    from _sim_utils import slab_sim

    tomo = slab_sim(11, shape=(128, 96, 96)).tomogram  # 384 nm box, 120 nm of ice
    model = random_model(0)
    kw = dict(device="cpu", precision="fp32", progress=False, tile=64)
    skip = predict_tomogram(tomo, model, **kw)
    whole = predict_tomogram(tomo, model, skip_vacuum=False, **kw)
    nz = skip.info["model_grid_shape"][0]
    (z0, z1), *_ = skip.info["network_box"]
    assert whole.info["network_box"][0] == [0, nz] and z1 - z0 <= 0.8 * nz
    assert skip.info["tiles"] < whole.info["tiles"]
    s = tomo.shape[0] / nz  # model-grid slices -> tomogram slices
    inner = slice(int(np.ceil((z0 + DEFAULT_CONTEXT) * s)) + 1, int((z1 - DEFAULT_CONTEXT) * s) - 1)
    assert inner.stop - inner.start >= 10
    np.testing.assert_allclose(skip.prob[inner], whole.prob[inner], atol=1e-4, rtol=0)  # tile rounding only
    assert not skip.prob[: int(z0 * s) - 1].any() and not skip.prob[int(np.ceil(z1 * s)) + 1 :].any()


def test_network_runs_only_around_the_region():
    """A region (e.g. the box of a cytoplasm mask): the map is 0 beyond it plus the tiling
    context, and inside it the whole-volume map."""
    tomo = Tomogram(vesicle_volume((48, 96, 96), n=8, seed=2), (22.0,) * 3)
    model = random_model(0)
    kw = dict(device="cpu", precision="fp32", progress=False, tile=64, skip_vacuum=False)
    region = (slice(8, 40), slice(30, 60), slice(0, 50))
    part = predict_tomogram(tomo, model, region=region, **kw)
    whole = predict_tomogram(tomo, model, **kw)
    assert part.info["network_box"] == [[0, 48], [6, 84], [0, 74]]  # region ± 24 voxels of context
    np.testing.assert_allclose(part.prob[region], whole.prob[region], atol=1e-4, rtol=0)
    assert not part.prob[:, :6].any() and not part.prob[:, 84:].any() and not part.prob[:, :, 74:].any()
    empty = predict_tomogram(tomo, model, region=(slice(0, 0),) * 3, **kw)
    assert empty.info["tiles"] == 0 and not empty.prob.any()


def test_zero_outside_clears_exactly_what_lies_outside_the_box():
    """Everything outside the network's box becomes 0 across slab boundaries; the box is not written
    (the network fills it)."""
    from cryoves.predict import zero_outside

    for box in ((slice(5, 70), slice(3, 20), slice(0, 9)), (slice(0, 80), slice(0, 24), slice(0, 30)),
                (slice(40, 41), slice(23, 24), slice(29, 30)), (slice(0, 0), slice(0, 0), slice(0, 0))):
        arr = np.full((80, 24, 30), 7.0, np.float32)
        zero_outside(arr, box, slab=16)
        inside = np.zeros(arr.shape, bool)
        inside[box] = True
        assert (arr[inside] == 7).all() and not arr[~inside].any()
