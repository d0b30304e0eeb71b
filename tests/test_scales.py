"""The size search: pyramid levels, radius ranges, the merge across levels, and the whole run on a
small volume with a 20 nm and a 60 nm vesicle."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoves.cli import app
from cryoves.errors import ParameterError
from cryoves.postprocess.scales import LEVEL_COLUMN, check_radius_range, merge_levels, plan_levels
from cryoves.vesicles import VesicleTable


def _radii(levels):
    return [round(lv.vesicle_radius_nm, 2) for lv in levels]


def test_default_levels_cover_12_to_90_nm_at_the_model_scale():
    levels = plan_levels(22.0, 22.0, 19.0)
    assert _radii(levels) == [19.0, 38.0, 57.0]
    assert [lv.grid_voxel_a for lv in levels] == [22.0, 44.0, 66.0]
    assert [round(lv.min_radius_nm, 1) for lv in levels] == [12.0, 24.0, 36.0]
    assert all(lv.max_radius_nm == 90.0 for lv in levels)


def test_coarse_tomograms_are_not_upsampled_unless_the_range_asks():
    levels = plan_levels(40.0, 22.0, 19.0)  # the HIV-1 VLP tomogram
    assert levels[0].grid_voxel_a == pytest.approx(40.0) and len(levels) == 2
    asked = plan_levels(40.0, 22.0, 19.0, radius_range_nm=(10.0, 90.0))
    assert asked[0].grid_voxel_a < 40.0 and asked[0].min_radius_nm == 10.0


def test_radius_range_selects_levels_and_the_hint_gives_one():
    assert _radii(plan_levels(22.0, 22.0, 19.0, radius_range_nm=(40.0, 90.0))) == [38.0, 57.0]
    assert _radii(plan_levels(22.0, 22.0, 19.0, radius_range_nm=(12.0, 25.0))) == [19.0]
    hint = plan_levels(22.0, 22.0, 19.0, hint_nm=55.0)
    assert _radii(hint) == [55.0] and hint[0].max_radius_nm == pytest.approx(137.5)


@pytest.mark.parametrize("rng, match", [
    ((20.0, 10.0), "0 < MIN < MAX"),
    ((0.0, 10.0), "0 < MIN < MAX"),
    ((float("nan"), 10.0), "0 < MIN < MAX"),
    ((3.0, 90.0), "under 2 voxels"),
    ((12.0, 1e6), "not a vesicle radius"),
    (("a", 5), "not two numbers"),
])
def test_bad_radius_ranges_are_refused(rng, match):
    with pytest.raises(ParameterError, match=match):
        check_radius_range(rng, 22.0)


def test_cli_bad_radius_range_is_one_line_exit_2(tmp_path):
    tomo = tmp_path / "t.mrc"
    tomo.write_bytes(b"")
    r = CliRunner().invoke(app, ["segment", str(tomo), "-o", str(tmp_path / "o"), "--radius-range", "30", "10"])
    assert r.exit_code == 2
    assert "0 < MIN < MAX" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def _table(spheres, vs=22.0):
    c = np.array([s[:3] for s in spheres], float)
    r = np.array([s[3] for s in spheres], float)
    return VesicleTable.from_spheres(c, r, vs, flags=[""] * len(r))


def test_merge_keeps_one_sphere_per_vesicle_from_the_level_that_fits_it():
    levels = plan_levels(22.0, 22.0, 19.0)
    # level 0: an SV (r 20 nm = 9.1 vx) and a fragment on the membrane of a 57 nm vesicle
    fine = _table([(20, 20, 20, 9.1), (60, 60, 80, 6.0)])
    mid = _table([(60, 60, 60, 24.0)])  # the large vesicle, r 52.8 nm, seen on the 44 Å level
    coarse = _table([(60.5, 60, 60, 25.9), (20, 20, 21, 9.0)])  # the same (r 57 nm) + the SV again
    merged, rejected = merge_levels([fine, mid, coarse], levels)
    assert len(merged) == 2
    big = merged.df.loc[merged.df["radius"].idxmax()]
    assert big["radius"] == pytest.approx(25.9) and big[LEVEL_COLUMN] == pytest.approx(6.6)
    small = merged.df.loc[merged.df["radius"].idxmin()]
    assert small[LEVEL_COLUMN] == pytest.approx(2.2)
    assert len(rejected) == 3 and set(rejected["step"]) == {"scale_merge"}
    assert list(merged.ids) == [1, 2]


def test_merge_keeps_touching_neighbours_of_different_sizes():
    levels = plan_levels(22.0, 22.0, 19.0)
    fine = _table([(20, 20, 20, 9.0)])
    coarse = _table([(20, 20, 20 + 9.0 + 26.0 + 0.5, 26.0)])  # touching, 0.5 voxel gap
    merged, rejected = merge_levels([fine, _table([]), coarse], levels)
    assert len(merged) == 2 and len(rejected) == 0


@pytest.fixture(scope="module")
def two_sizes():
    from cryoves.simulate import SimulationConfig, VesiclePopulation, simulate

    cfg = SimulationConfig.preset(
        "small", shape=(80, 128, 128), n_vesicles=1, radius_mean_nm=20.0, radius_sd_nm=0.0, large_tail_fraction=0.0,
        populations=(VesiclePopulation("large", 1, 60.0, 0.0),), n_endosomes=0, n_clumps=0, n_actin=0,
    )
    return simulate(cfg, seed=3)


def _matched_radii(found, gt):
    from cryoves.evaluate import match_centre

    m = match_centre(found, gt)
    return sorted(round(float(r)) for r in gt.df.set_index("id").loc[m["gt_id"], "radius_nm"])


def test_a_20_nm_and_a_60_nm_vesicle_are_both_found_without_a_hint(two_sizes):
    from cryoves.pipeline import SegmentConfig, segment

    gt = two_sizes.vesicles
    assert sorted(round(r) for r in gt.df["radius_nm"]) == [20, 60]
    res = segment(two_sizes.tomogram, None, SegmentConfig(report=False))
    assert _matched_radii(res.vesicles, gt) == [20, 60]
    assert len(res.vesicles) == 2
    assert len(res.manifest["prediction"]["levels"]) == 3
    assert set(res.vesicles.df[LEVEL_COLUMN]) <= {2.2, 4.4, 6.6}


def test_radius_range_limits_what_is_found(two_sizes):
    from cryoves.pipeline import SegmentConfig, segment

    gt = two_sizes.vesicles
    large = segment(two_sizes.tomogram, None, SegmentConfig(report=False, radius_range_nm=(40.0, 90.0)))
    assert _matched_radii(large.vesicles, gt) == [60] and (large.vesicles.df["radius_nm"] >= 40).all()
    small = segment(two_sizes.tomogram, None, SegmentConfig(report=False, radius_range_nm=(12.0, 30.0)))
    # (a piece of the 60 nm vesicle may be fitted as a small one: nothing looks for it at this range)
    assert 20 in _matched_radii(small.vesicles, gt) and (small.vesicles.df["radius_nm"] <= 30).all()


def test_a_piece_visited_first_removes_nothing_but_itself():
    levels = plan_levels(22.0, 22.0, 19.0)
    # a clear piece (r 6 vx) inside a large vesicle (r 26 vx) overlaps an SV just outside the large one
    piece = (60, 60, 80, 6.0)
    sv = (60, 60, 89.6, 7.0)
    fine = VesicleTable.from_spheres(np.array([piece[:3], sv[:3]], float), np.array([piece[3], sv[3]]), 22.0,
                                     flags=["", ""], membrane_contrast=[1.0, 0.6], membrane_coverage=[1.0, 0.9])
    big = VesicleTable.from_spheres(np.array([[60.0, 60.0, 60.0]]), np.array([26.0]), 22.0, flags=[""],
                                    membrane_contrast=[0.7], membrane_coverage=[0.9])
    merged, rejected = merge_levels([fine, _table([]), big], levels)
    assert sorted(np.round(merged.radii, 1)) == [7.0, 26.0]
    assert len(rejected) == 1 and rejected["radius"].iloc[0] == pytest.approx(6.0)


def _recording_coarse_map(monkeypatch, pause: float = 0.0):
    import threading
    import time

    import cryoves.pipeline as pl

    calls = []
    real = pl._coarse_map

    def record(lvl, **kwargs):
        calls.append(["start", threading.current_thread().name])
        time.sleep(pause)
        out = real(lvl, **kwargs)
        calls[-1][0] = "done"
        return out

    monkeypatch.setattr(pl, "_coarse_map", record)
    return calls


def test_coarse_maps_run_beside_the_finest_level_with_the_one_process_result(two_sizes, monkeypatch):
    """With post-processing workers the coarse levels' maps come from a background thread, while the
    finest level is post-processed; the vesicles are those of the run that computes them in turn."""
    from cryoves import parallel
    from cryoves.pipeline import SegmentConfig, segment

    calls = _recording_coarse_map(monkeypatch)
    runs = {}
    for n in (1, 2):
        parallel.set_workers(n)
        try:
            runs[n] = segment(two_sizes.tomogram, None, SegmentConfig(report=False))
        finally:
            parallel.set_workers(None)
    assert [c[1] for c in calls[:2]] == ["MainThread"] * 2
    assert all(c[1].startswith("cryoves-background") for c in calls[2:]) and len(calls) == 4
    assert runs[1].vesicles.df.equals(runs[2].vesicles.df)
    assert runs[1].rejected.df.equals(runs[2].rejected.df)
    assert len(runs[2].vesicles) == 2


def test_a_failure_waits_for_the_background_maps(two_sizes, monkeypatch):
    """An error in the finest level's steps ends the run only after the background thread stopped
    (it reads the shared tomogram, released on the way out): no map is left half done."""
    import threading

    import cryoves.postprocess.outliers as outliers
    from cryoves import parallel
    from cryoves.pipeline import SegmentConfig, segment

    calls = _recording_coarse_map(monkeypatch, pause=1.0)

    def fail(*_a, **_k):
        raise RuntimeError("outlier step failed")

    monkeypatch.setattr(outliers, "repair", fail)
    parallel.set_workers(2)
    try:
        with pytest.raises(RuntimeError, match="outlier step failed"):
            segment(two_sizes.tomogram, None, SegmentConfig(report=False))
    finally:
        parallel.set_workers(None)
    assert calls and all(c[0] == "done" for c in calls)  # the pause keeps the first running: it was waited for
    assert not [t for t in threading.enumerate() if t.name.startswith("cryoves-background")]
