import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter, generate_binary_structure

from _post_utils import random_scene
from cryoves.errors import InputError, ParameterError
from cryoves.postprocess.threshold import DEFAULT_THRESHOLDS, global_threshold, neighbourhood_min


def brute_scores(prob, intensity, thresholds):
    """The original definition: shell = mask minus its erosion by ball(1) (border counts as foreground)."""
    out = []
    for t in thresholds:
        b = prob > t
        e = binary_erosion(b, generate_binary_structure(3, 1), border_value=1)
        s = b & ~e
        out.append(intensity[s].mean() if s.any() else np.inf)
    return np.array(out)


def test_neighbourhood_min_matches_erosion_of_values():
    rng = np.random.default_rng(0)
    p = rng.random((5, 6, 7)).astype(np.float32)
    m = neighbourhood_min(p)
    padded = np.pad(p, 1, constant_values=np.inf)
    ref = np.min(
        [padded[1 + dz : 6 + dz, 1 + dy : 7 + dy, 1 + dx : 8 + dx]
         for dz, dy, dx in [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]],
        axis=0,
    )
    np.testing.assert_array_equal(m, ref)


@pytest.mark.parametrize("slab", [3, 32])
def test_scores_equal_bruteforce_erosion(slab):
    rng = np.random.default_rng(1)
    prob = gaussian_filter(rng.random((20, 24, 28)), 1.5).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    inten = rng.normal(size=prob.shape).astype(np.float32)
    t = np.round(np.linspace(0.3, 0.95, 14), 3)[::-1]  # unsorted order on purpose
    res = global_threshold(prob, inten, thresholds=t, slab=slab)
    ref = brute_scores(prob, inten, t.astype(np.float32))
    np.testing.assert_allclose(res.scores, ref, rtol=1e-6, atol=1e-7)
    assert res.threshold == t[int(np.argmin(ref))]
    assert not res.fallback


def test_slabs_on_threads_give_the_numbers_of_one_thread(monkeypatch):
    """The slabs run on threads and their sums are added in slab order: the scores of the loop, bit
    for bit."""
    from cryoves import parallel

    rng = np.random.default_rng(4)
    prob = gaussian_filter(rng.random((40, 24, 28)), 1.5).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    inten = rng.normal(size=prob.shape).astype(np.float32)
    t = np.round(np.linspace(0.3, 0.95, 14), 3)
    runs, mapped = [], []
    real = parallel.thread_map
    monkeypatch.setattr(parallel, "thread_map", lambda fn, items: mapped.append(len(items)) or real(fn, items))
    for n in (1, 3):
        monkeypatch.setattr(parallel, "workers", lambda n=n: n)
        runs.append(global_threshold(prob, inten, thresholds=t, slab=4).scores)
    assert mapped == [10, 10]  # the 10 slabs of 4 sections went through the thread map
    assert np.array_equal(runs[0], runs[1])


def test_default_grid_on_vesicles_matches_bruteforce():
    s = random_scene(n=5, shape=(40, 56, 56), seed=3)
    res = global_threshold(s.prob, s.intensity)
    np.testing.assert_allclose(res.scores, brute_scores(s.prob, s.intensity, DEFAULT_THRESHOLDS.astype(np.float32)), rtol=1e-6)
    assert res.threshold == pytest.approx(DEFAULT_THRESHOLDS[np.argmin(res.scores)])


def test_empty_shells_score_inf_and_fallback():
    prob = np.zeros((6, 6, 6), np.float32)
    prob[2:4, 2:4, 2:4] = 0.85  # shells exist only for t < 0.85
    inten = np.ones_like(prob)
    res = global_threshold(prob, inten)
    assert np.isinf(res.scores[DEFAULT_THRESHOLDS >= 0.85]).all()
    assert np.isfinite(res.scores[DEFAULT_THRESHOLDS < 0.85]).all()
    assert res.threshold < 0.85
    empty = global_threshold(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.float32))
    assert empty.fallback and np.isinf(empty.scores).all() and empty.threshold == pytest.approx(0.80)


def test_bad_inputs():
    with pytest.raises(InputError):
        global_threshold(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ParameterError):
        global_threshold(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), thresholds=[])
