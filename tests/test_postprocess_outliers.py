import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import mahalanobis
from scipy.stats import chi2

from _post_utils import bilayer_vesicle, random_scene
from cryoves.errors import ParameterError
from cryoves.postprocess import REJECTED_COLUMNS, fit_spheres, label_vesicles, repair, resolve_overlaps
from cryoves.postprocess.outliers import FEATURES, mahalanobis_test, robust_mean_cov
from cryoves.vesicles import VesicleTable

VS = 10.0


def _table(n=12, seed=0, **extra):
    rng = np.random.default_rng(seed)
    centres = np.stack([np.full(n, 50.0), np.full(n, 50.0), np.arange(n) * 40.0 + 20], axis=1)  # far apart
    cols = dict(
        membrane_thickness_nm=rng.normal(4.5, 0.3, n),
        membrane_density=rng.normal(-1.0, 0.05, n),
        profile_correlation=rng.uniform(0.8, 1.0, n),
    )
    cols.update(extra)
    return VesicleTable.from_spheres(centres, rng.normal(18.0, 1.0, n), VS, **cols)


def test_mahalanobis_is_chi2_on_squared_distance_df3():
    t = _table()
    dist, p = mahalanobis_test(t, robust=False, exact=False)
    x = t.df[FEATURES].to_numpy()
    ref = []
    for i in range(len(x)):  # leave-one-out: each vesicle against the others
        o = np.delete(x, i, axis=0)
        ref.append(mahalanobis(x[i], o.mean(0), np.linalg.inv(np.cov(o, rowvar=False))))
    ref = np.array(ref)
    np.testing.assert_allclose(dist, ref, rtol=1e-6)
    np.testing.assert_allclose(p, chi2.sf(ref**2, df=3), rtol=1e-6)


def test_outlier_removed_with_reason_and_others_kept():
    t = _table(n=15)
    df = t.df.copy()
    df.loc[3, "membrane_thickness_nm"] = 12.0
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert list(rej.columns) == REJECTED_COLUMNS
    assert list(rej["id"]) == [df.loc[3, "id"]] and rej["step"].iloc[0] == "outlier"
    assert "p =" in rej["reason"].iloc[0]
    assert len(out) == 14 and out.df["p_value"].notna().all()


def test_small_n_skips_mahalanobis(caplog):
    t = _table(n=4)
    df = t.df.copy()
    df.loc[0, "membrane_thickness_nm"] = 50.0
    with caplog.at_level(logging.INFO, logger="cryoves.postprocess.outliers"):
        out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert len(out) == 4 and len(rej) == 0
    assert out.df["mahalanobis"].isna().all()
    assert "skipped" in caplog.text and "at least 5" in caplog.text


def test_correlation_filter():
    t = _table(n=8)
    df = t.df.copy()
    df.loc[2, "profile_correlation"] = 0.1
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert list(rej["step"]) == ["correlation"] and rej["id"].iloc[0] == df.loc[2, "id"]
    assert len(out) == 7


def test_min_radius_removal():
    t = _table(n=6)
    out, rej = repair(t, None, min_radius_nm=18.0)
    small = t.df["radius"] * VS / 10 <= 18.0
    assert set(rej.loc[rej["step"] == "min_radius", "id"]) == set(t.df["id"][small])
    assert (out.df["radius_nm"] > 18.0).all()


def test_regrow_refits_outlier_from_a_bad_fit():
    s = random_scene(n=9, shape=(56, 96, 96), seed=21, r_range=(9.0, 11.0))
    labels, _ = label_vesicles(s.prob, 0.5, s.voxel_size, min_radius_nm=4)
    table, _ = fit_spheres(s.intensity, labels, s.voxel_size)
    df = table.df.copy()
    true_r = df.loc[0, "radius"]
    df.loc[0, "radius"] = true_r * 1.35  # a bad fit: features far off
    df.loc[0, "membrane_thickness_nm"] *= 2.5
    bad = table.with_df(df)
    _, rej_no = repair(bad, None, min_radius_nm=4)
    assert df.loc[0, "id"] in set(rej_no["id"])
    fixed, rej = repair(bad, s.intensity, min_radius_nm=4)
    assert df.loc[0, "id"] not in set(rej["id"])
    row = fixed.df.set_index("id").loc[df.loc[0, "id"]]
    assert abs(row["radius"] - true_r) < 0.3


def test_duplicate_removed_and_overlaps_shrunk():
    centres = [(50, 50, 50), (50, 50, 52), (50, 50, 75), (50, 80, 50)]
    t = VesicleTable.from_spheres(centres, [10, 9, 16, 10], VS, profile_correlation=[0.9, 0.5, 0.9, 0.9])
    out, rej = repair(t, None, min_radius_nm=1.0)
    assert list(rej["id"]) == [2] and rej["step"].iloc[0] == "overlap"
    c, r = out.centres, out.radii
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    iu = np.triu_indices(len(r), 1)
    assert (d[iu] >= (r[:, None] + r[None])[iu]).all()
    assert r[out.ids == 4][0] == 10  # untouched


def test_duplicate_with_more_membrane_evidence_wins_over_a_cleaner_profile():
    # pieces of one over-split vesicle: the true fit (r 12, membrane all round) and a fit to a small
    # dark feature inside it whose normalised profile happens to correlate better
    t = VesicleTable.from_spheres(
        [(50, 50, 50), (52, 51, 50)], [12.0, 6.5], VS, profile_correlation=[0.5, 0.86],
        membrane_contrast=[0.9, 1.3], membrane_coverage=[0.95, 0.55],
    )
    out, rej = repair(t, None, min_radius_nm=1.0)
    assert list(out.ids) == [1] and list(rej["id"]) == [2]
    assert "membrane evidence" in rej["reason"].iloc[0]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_resolve_overlaps_never_leaves_intersections(seed):
    rng = np.random.default_rng(seed)
    n = 30
    c = rng.uniform(0, 60, (n, 3))
    r = rng.uniform(2, 10, n)
    keep, r2 = resolve_overlaps(c, r)
    c, r2 = c[keep], r2[keep]
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    iu = np.triu_indices(len(r2), 1)
    assert (d[iu] >= (r2[:, None] + r2[None])[iu]).all()
    assert (r2 <= r[keep]).all() and (r2 > 0).all()


def test_robust_covariance_resists_outliers():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (200, 3))
    x[:30] += 8.0
    mu, cov = robust_mean_cov(x)
    assert np.abs(mu).max() < 0.3
    assert np.abs(x[:30].mean(0) * 0 + x.mean(0)).max() > 1.0  # the classical mean is pulled away
    assert np.all(np.diag(cov) < 2.0)


def test_bad_parameters():
    with pytest.raises(ParameterError):
        repair(_table(), None, p_threshold=2.0)


def test_exact_p_values_are_calibrated_for_small_n():
    from cryoves.postprocess.outliers import leave_one_out_d2, loo_p_value

    rng = np.random.default_rng(3)
    n = 8
    p_exact, p_chi2 = [], []
    for _ in range(400):
        x = rng.normal(size=(n, 3)) * [1.0, 5.0, 0.1]
        d2 = leave_one_out_d2(x)
        p_exact.append(loo_p_value(d2, n, 3))
        p_chi2.append(chi2.sf(d2, 3))
    p_exact, p_chi2 = np.concatenate(p_exact), np.concatenate(p_chi2)
    assert 0.08 < np.mean(p_exact < 0.1) < 0.12  # uniform under the null
    assert np.mean(p_chi2 < 0.1) > 0.3  # the asymptotic chi2 over-flags at small n


def test_objects_without_membrane_are_removed_by_contrast():
    s = random_scene(n=6, shape=(56, 96, 96), seed=4, r_range=(9.0, 11.0))
    prob = s.prob.copy()
    # two false detections in plain noise
    zz, yy, xx = np.indices(prob.shape)
    taken = np.zeros(prob.shape, bool)
    for c, r in zip(s.centres, s.radii):
        taken |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= (r + 12) ** 2
    free = np.argwhere(~taken & (zz > 12) & (zz < 44) & (yy > 12) & (yy < 84) & (xx > 12) & (xx < 84))
    fakes = [free[0], free[np.argmax(np.linalg.norm(free - free[0], axis=1))]]
    for c in fakes:
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 81] = 1.0
    labels, _ = label_vesicles(prob, 0.5, s.voxel_size, min_radius_nm=4)
    table, _ = fit_spheres(s.intensity, labels, s.voxel_size)
    fakes = np.array(fakes)

    def n_fakes(t):
        return int((np.min(np.linalg.norm(t.centres[:, None] - fakes[None], axis=-1), axis=1) < 5).sum())

    # the correlation filter and the Mahalanobis test are switched off to test the contrast filter alone
    kept_all, _ = repair(table, s.intensity, min_radius_nm=4, min_correlation=-1, min_contrast_fraction=0, p_threshold=0)
    assert n_fakes(kept_all) == 2
    out, rej = repair(table, s.intensity, min_radius_nm=4, min_correlation=-1, p_threshold=0)
    assert set(rej["step"]) == {"contrast"} and n_fakes(out) == 0
    assert len(out) == len(s.radii)  # every real vesicle survives


def test_coverage_filter_is_optional():
    t = _table(n=6, membrane_coverage=[0.95, 0.9, 0.4, 0.92, 0.97, 0.9])
    kept, rej = repair(t, None, min_radius_nm=1.0)
    assert len(kept) == 6 and len(rej) == 0  # off by default
    kept, rej = repair(t, None, min_radius_nm=1.0, min_coverage=0.6)
    assert list(rej["step"]) == ["coverage"] and rej["id"].iloc[0] == t.df["id"].iloc[2]


def _supported_table(n=15, **extra):
    """Far-apart vesicles with a confident map and a clear membrane in every direction."""
    rng = np.random.default_rng(3)
    return _table(n=n, membrane_contrast=rng.normal(1.0, 0.05, n), membrane_coverage=np.full(n, 0.95),
                  map_confidence=np.full(n, 0.95), **extra)


def test_supported_mahalanobis_outlier_is_flagged_not_removed():
    t = _supported_table()
    df = t.df.copy()
    df.loc[3, "membrane_thickness_nm"] = 12.0  # far outside the population: p ~ 1e-30
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert len(rej) == 0 and len(out) == 15
    flags = out.df.set_index("id")["flags"]
    assert flags.loc[df.loc[3, "id"]].startswith("Mahalanobis outlier")
    assert (flags.drop(df.loc[3, "id"]) == "").all()


def test_unsupported_mahalanobis_outlier_is_still_removed():
    t = _supported_table()
    df = t.df.copy()
    df.loc[3, "membrane_thickness_nm"] = 12.0
    df.loc[3, "map_confidence"] = 0.2  # the network does not see a vesicle there
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert list(rej["step"]) == ["outlier"] and len(out) == 14


def test_low_correlation_with_confident_map_and_membrane_is_flagged():
    t = _supported_table(n=8)
    df = t.df.copy()
    df.loc[2, "profile_correlation"] = 0.1
    df.loc[5, "profile_correlation"] = 0.1
    df.loc[5, "map_confidence"] = 0.3  # the network is not confident there: not supported
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert list(rej["id"]) == [df.loc[5, "id"]] and list(rej["step"]) == ["correlation"]
    assert out.df.set_index("id").loc[df.loc[2, "id"], "flags"] == "profile correlation 0.10"


def test_correlation_removal_limit_follows_the_population():
    # a noisy tomogram: correlations spread widely, so 0.25 is within the population (flag, not removal)
    rng = np.random.default_rng(0)
    corr = np.clip(rng.normal(0.5, 0.25, 40), -0.2, 1.0)
    corr[0] = 0.25
    t = _table(n=40, profile_correlation=corr)
    out, rej = repair(t, None, min_radius_nm=1.0, p_threshold=0.0)
    assert t.df.loc[0, "id"] in set(out.ids)
    assert "profile correlation 0.25" in out.df.set_index("id").loc[t.df.loc[0, "id"], "flags"]
    # a tight population keeps the absolute limit
    t = _table(n=8)
    df = t.df.copy()
    df.loc[2, "profile_correlation"] = 0.25
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert list(rej["id"]) == [df.loc[2, "id"]]


def test_map_confidence_is_the_mean_probability_inside_the_sphere():
    from cryoves.postprocess.outliers import map_confidence

    prob = np.zeros((30, 30, 30), np.float32)
    zz, yy, xx = np.mgrid[:30, :30, :30]
    prob[(zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 36] = 0.9
    conf = map_confidence(prob, [[10, 10, 10], [22, 22, 22], [-50, 0, 0]], [8.0, 5.0, 3.0])
    assert conf[0] == pytest.approx(0.9) and conf[1] == 0.0 and np.isnan(conf[2])


def test_well_fitted_vesicles_with_ctf_fringes_are_kept():
    # no CTF correction, 8 µm underfocus, 1.6 nm voxels: bright/dark fringes flank every membrane
    from cryoves.postprocess.outliers import map_confidence

    boxes = [bilayer_vesicle(seed, ctf=True, radius=11.0 + 0.4 * seed) for seed in range(6)]
    vol = np.concatenate([b[0] for b in boxes], axis=2)
    n = boxes[0][0].shape[0]
    centres = np.array([b[1] + [0, 0, k * n] for k, b in enumerate(boxes)])
    radii = np.array([b[2] for b in boxes])
    vs = boxes[0][3]
    truth = VesicleTable.from_spheres(centres, radii, vs)
    labels = truth.to_labels(vol.shape)
    prob = (labels > 0).astype(np.float32)
    fits, rej_fit = fit_spheres(vol, labels, vs)
    fits = fits.with_df(fits.df.assign(map_confidence=map_confidence(prob, fits.centres, fits.radii)))
    out, rej = repair(fits, vol, min_radius_nm=5.0)
    assert len(rej_fit) == 0 and len(rej) == 0 and len(out) == 6
    got = out.df.sort_values("x")
    np.testing.assert_allclose(got["radius"], radii, atol=0.4)
    np.testing.assert_allclose(got[["z", "y", "x"]].to_numpy(), centres, atol=0.4)


def test_two_doubts_remove_even_a_supported_fit():
    t = _supported_table()
    df = t.df.copy()
    df.loc[3, "membrane_thickness_nm"] = 12.0  # Mahalanobis outlier ...
    df.loc[3, "profile_correlation"] = 0.1  # ... with a doubtful profile as well
    out, rej = repair(t.with_df(df), None, min_radius_nm=1.0)
    assert list(rej["step"]) == ["outlier"] and len(out) == 14


def test_a_profile_anticorrelated_with_the_population_is_removed_even_when_supported():
    rng = np.random.default_rng(0)
    corr = np.clip(rng.normal(0.4, 0.3, 30), -0.3, 1.0)  # noisy tomogram: fence far below 0
    corr[0] = -0.5
    t = _supported_table(n=30, profile_correlation=corr)
    out, rej = repair(t, None, min_radius_nm=1.0, p_threshold=0.0)
    assert t.df.loc[0, "id"] in set(rej["id"]) and t.df.loc[0, "id"] not in set(out.ids)


_NO_STATS_PROBE = """
import sys
sys.path.insert(0, {tests!r})
from _post_utils import random_scene
from cryoves.postprocess import fit_spheres, label_vesicles, repair
s = random_scene(n=9, shape=(56, 96, 96), seed=21, r_range=(9.0, 11.0))
labels, _ = label_vesicles(s.prob, 0.5, s.voxel_size, min_radius_nm=4)
table, _ = fit_spheres(s.intensity, labels, s.voxel_size)
df = table.df.copy()
df.loc[0, "radius"] *= 1.35
df.loc[0, "membrane_thickness_nm"] *= 2.5
fixed, rejected = repair(table.with_df(df), s.intensity, min_radius_nm=4)
print(len(fixed), "scipy.stats" in sys.modules)
"""


def test_fits_and_outlier_tests_do_not_import_scipy_stats(tmp_path):
    """scipy.stats costs 0.3 s to import in every process (the workers re-fit outliers and test them
    again): the distributions come from scipy.special, the ranks from numpy."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "probe.py"
    script.write_text(_NO_STATS_PROBE.format(tests=str(Path(__file__).parent)))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    n, imported = res.stdout.split()
    assert int(n) >= 8 and imported == "False"


def test_the_distribution_functions_are_scipy_stats_to_the_bit():
    from scipy.stats import f

    from cryoves.postprocess.outliers import _chi2_ppf, loo_p_value

    d2 = np.r_[0.0, np.random.default_rng(2).exponential(4.0, 200)]
    for n in (5, 9, 40):
        nu, t2 = n - 2, d2 * (n - 1) / n
        assert np.array_equal(loo_p_value(d2, n), f.sf((nu - 2) / (3 * nu) * t2, 3, nu - 2))
    assert _chi2_ppf(0.975, 3) == chi2.ppf(0.975, 3) and _chi2_ppf(0.5, 3) == chi2.ppf(0.5, 3)
