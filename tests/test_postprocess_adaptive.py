import numpy as np
import pytest

from _post_utils import synthetic
from cryoves.errors import ParameterError
from cryoves.postprocess import REJECTED_COLUMNS
from cryoves.postprocess.adaptive import label_vesicles, rejoin_duplicate_pieces

VS = 10.0  # Å; min_radius_nm=4 -> 4 voxels

SINGLES = [(20, 16, 16), (20, 16, 60), (20, 60, 16), (20, 60, 60)]


def _scene(extra_centres, radius=7.0, shape=(40, 80, 80), **kw):
    centres = SINGLES + list(extra_centres)
    return synthetic(shape=shape, centres=centres, radii=[radius] * len(centres), **kw)


def _ids_at(labels, centres):
    return [int(labels[tuple(np.round(c).astype(int))]) for c in centres]


def test_six_connectivity_everywhere():
    prob = np.zeros((12, 12, 12), np.float32)
    prob[2:6, 2:6, 2:6] = 1
    prob[6:10, 6:10, 2:6] = 1  # touches the first cube along an edge only
    labels, rej = label_vesicles(prob, 0.5, VS, min_radius_nm=0.1, separate=False, shape_split=False, expand=False, extent_range=(0, 1))
    assert labels.dtype == np.uint32
    assert len(np.unique(labels[labels > 0])) == 2
    assert list(rej.columns) == REJECTED_COLUMNS and len(rej) == 0


@pytest.mark.parametrize("pair_centre", [(20, 38, 38), (8, 38, 38)])  # second one: within 10 voxels of z=0
def test_merged_pair_is_split_with_fresh_ids_and_no_lost_voxels(pair_centre):
    c = np.array(pair_centre, float)
    a, b = c - [0, 4.5, 4.5], c + [0, 4.5, 4.5]  # diagonal pair, centres 12.7 apart, r=7: merged
    s = _scene([a, b])
    t = 0.5
    plain, _ = label_vesicles(s.prob, t, VS, min_radius_nm=4, separate=False, shape_split=False, expand=False)
    ia, ib = _ids_at(plain, [a, b])
    assert ia == ib != 0, "test setup: the pair must be merged at the global threshold"
    labels, rej = label_vesicles(s.prob, t, VS, min_radius_nm=4, separate=True, expand=False)
    na, nb = _ids_at(labels, [a, b])
    assert na != nb and na > plain.max() and nb > plain.max()
    # every voxel of the merged object went to one of the pieces
    merged = plain == ia
    assert set(np.unique(labels[merged])) == {na, nb}
    assert np.count_nonzero(labels) == np.count_nonzero(plain)
    # singles untouched
    assert _ids_at(labels, SINGLES) == _ids_at(plain, SINGLES)


def test_chain_of_three_is_split_recursively():
    cs = [(20, 38, 26), (20, 38, 38.5), (20, 38, 51)]
    s = _scene(cs, radius=6.5)
    plain, _ = label_vesicles(s.prob, 0.5, VS, min_radius_nm=4, separate=False, shape_split=False, expand=False)
    assert len(set(_ids_at(plain, cs))) == 1
    labels, _ = label_vesicles(s.prob, 0.5, VS, min_radius_nm=4, separate=True, expand=False)
    assert len(set(_ids_at(labels, cs))) == 3


def test_islands_of_a_saturated_plateau_do_not_split_a_vesicle():
    """Inside one vesicle a map near 1 breaks into islands only above 0.99 (0.9995 around two
    0.9999 cores here): that is no merged pair, the object is not split; a pair whose map dips
    between its balls is."""
    from cryoves.postprocess.adaptive import _try_split

    z, y, x = np.indices((24, 24, 36))
    obj = (z - 12) ** 2 + (y - 12) ** 2 + (x - 18) ** 2 <= 10**2
    prob = np.where(obj, 0.9995, 0.1).astype(np.float32)
    for cx in (12, 24):  # two islands of 27 voxels, 12 apart
        prob[11:14, 11:14, cx - 1 : cx + 2] = 0.9999
    assert _try_split(prob, obj, 0.5, min_piece=20) is None
    prob[obj & (np.abs(x - 18) <= 1)] = 0.9  # a valley between the two halves
    pieces, th = _try_split(prob, obj, 0.5, min_piece=20)
    assert th == 0.9 and set(np.unique(pieces[obj])) == {1, 2}


def test_partly_detected_vesicle_is_grown():
    s = _scene([(20, 38, 38)])
    prob = s.prob.copy()
    # the fifth vesicle is weakly detected: only a small core passes the global threshold
    zz, yy, xx = np.ogrid[:40, :80, :80]
    near = (zz - 20) ** 2 + (yy - 38) ** 2 + (xx - 38) ** 2 <= 10**2
    prob[near] *= 0.8
    t = 0.78
    small, rej_small = label_vesicles(prob, t, VS, min_radius_nm=6, min_volume_fraction=1.0, separate=False, shape_split=False, expand=False)
    assert small[20, 38, 38] == 0 and (rej_small["reason"].str.contains("volume")).any()
    grown, rej = label_vesicles(prob, t, VS, min_radius_nm=6, min_volume_fraction=1.0, separate=False, shape_split=False, expand=True)
    assert grown[20, 38, 38] != 0
    assert np.count_nonzero(grown == grown[20, 38, 38]) >= 4 / 3 * np.pi * 6**3
    assert not rej["z"].between(15, 25).any() or len(rej) == 0


def test_discard_rules_record_reasons():
    prob = np.zeros((30, 30, 30), np.float32)
    prob[2, 2, 2:4] = 1  # tiny: 2 voxels < a 1-voxel-radius ball
    prob[10, 5:25, 10] = 1  # thin rod: ok volume at min radius 1 voxel, extent 1.0 > 0.75
    labels, rej = label_vesicles(prob, 0.5, VS, min_radius_nm=1.0, min_volume_fraction=1.0, separate=False, shape_split=False, expand=False)
    assert not labels.any()
    assert set(rej["step"]) == {"label"}
    assert rej["reason"].str.contains("volume").sum() == 1
    assert rej["reason"].str.contains("extent").sum() == 1
    assert np.isfinite(rej[["z", "y", "x", "radius"]].to_numpy()).all()


def test_bad_threshold():
    with pytest.raises(ParameterError):
        label_vesicles(np.zeros((4, 4, 4)), 1.5, VS)


def test_touching_pieces_fitted_to_one_vesicle_are_rejoined_under_a_fresh_id():
    zz, yy, xx = np.indices((40, 40, 80))
    ball = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2
    labels = np.zeros(ball.shape, np.uint32)
    labels[ball & (xx < 20)] = 3
    labels[ball & (xx >= 20)] = 5  # touching halves of one vesicle
    labels[(zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 55) ** 2 <= 8**2] = 7
    labels[:2, :2, 40:42] = 9  # apart from 7 although its sphere claims the same vesicle
    before = labels.copy()
    centres = [(20, 20, 19.5), (20, 20, 20.5), (20, 20, 55), (20.5, 20, 55)]
    joined, new = rejoin_duplicate_pieces(labels, [3, 5, 7, 9], centres, [10, 10, 8, 8])
    np.testing.assert_array_equal(labels, before)  # the input is left as it was
    assert new == [10]
    assert set(np.unique(joined[ball])) == {10} and (joined == 10).sum() == ball.sum()
    assert (joined == 7).sum() == (before == 7).sum() and (joined == 9).sum() == 8
    # far-apart spheres are never joined
    same, none = rejoin_duplicate_pieces(labels, [3, 7], [(20, 20, 15), (20, 20, 55)], [10, 8])
    assert none == [] and same is labels
    # in place (the pipeline's way: no second label volume in memory): the same volume
    inplace, new2 = rejoin_duplicate_pieces(labels, [3, 5, 7, 9], centres, [10, 10, 8, 8], inplace=True)
    assert inplace is labels and new2 == new
    np.testing.assert_array_equal(inplace, joined)


def _ellipsoids(shape, centres, radius, z_stretch):
    """Saturated map (p = 1 inside) of balls stretched along z, as the missing wedge smears them."""
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    prob = np.zeros(shape, np.float32)
    for c in centres:
        inside = ((zz - c[0]) / (z_stretch * radius)) ** 2 + ((yy - c[1]) / radius) ** 2 + ((xx - c[2]) / radius) ** 2
        prob[inside <= 1] = 1.0
    return prob


@pytest.mark.parametrize("n_stack", [2, 3])
def test_vesicles_merged_along_z_are_split_by_shape(n_stack):
    # a pair / triple stacked in z whose smeared maps overlap with no dip at all: raising the threshold
    # can never separate them, the neck between the balls does
    shape = (24 + 16 * n_stack, 40, 40)
    stack = [(12 + 16 * k, 20, 20) for k in range(n_stack)]
    prob = _ellipsoids(shape, stack, 7.0, 1.4)
    plain, _ = label_vesicles(prob, 0.5, VS, min_radius_nm=4, separate=True, shape_split=False, expand=False)
    assert len(set(_ids_at(plain, stack))) == 1, "test setup: the stack must stay merged without the shape split"
    labels, rej = label_vesicles(prob, 0.5, VS, min_radius_nm=4, expand=False)
    assert len(set(_ids_at(labels, stack))) == n_stack and 0 not in _ids_at(labels, stack)
    assert np.count_nonzero(labels) == np.count_nonzero(plain) and len(rej) == 0


def test_single_smeared_vesicle_is_not_split_by_shape():
    prob = _ellipsoids((40, 40, 40), [(20, 20, 20)], 8.0, 1.5)
    labels, _ = label_vesicles(prob, 0.5, VS, min_radius_nm=4, expand=False)
    assert len(np.unique(labels[labels > 0])) == 1


def test_irregular_piece_holding_a_ball_is_kept_but_a_sheet_is_not():
    # a split piece: a ball with a thin flange (extent < 0.25) is a vesicle for the fit to judge;
    # a flat sheet of the same extent holds no ball and is discarded
    shape = (40, 80, 80)
    prob = _ellipsoids(shape, [(20, 20, 20)], 6.0, 1.0)
    prob[19:21, 20:34, 20:34] = 1.0  # flange: extent of the piece drops below 0.25
    prob[5:7, 40:75, 40:75] = 1.0  # sheet
    prob[5:30, 40:42, 40:42] = 1.0
    labels, rej = label_vesicles(prob, 0.5, VS, min_radius_nm=4, separate=False, shape_split=False, expand=False)
    assert labels[20, 20, 20] != 0
    assert labels[5, 60, 60] == 0 and rej["reason"].str.contains("no ball").sum() == 1


def _blobs(rng, shape):
    """A smooth random probability box and the object mask of its 0.3 level."""
    from scipy.ndimage import gaussian_filter

    p = gaussian_filter(rng.random(shape), 1.5)
    p = ((p - p.min()) / np.ptp(p)).astype(np.float32)
    return p, p > 0.3


def test_pieces_per_threshold_from_one_pass_equal_labelling_at_each_threshold():
    """The union-find pass over an object's voxels counts, at every threshold of the split sweep,
    the same big 6-connected pieces as labelling the thresholded object there (ties included)."""
    import cc3d

    from cryoves.postprocess._label_kernels import big_pieces_per_level
    from cryoves.postprocess.adaptive import _split_thresholds

    rng = np.random.default_rng(3)
    for trial in range(12):
        p, o = _blobs(rng, tuple(rng.integers(4, 20, 3)))
        if trial % 3 == 0:
            p = np.round(p * 20).astype(np.float32) / 20  # plateaus and values on the thresholds
        levels = _split_thresholds(0.3)
        min_piece = int(rng.integers(1, 12))
        got = big_pieces_per_level(p, o, levels, min_piece)
        for t, n in zip(levels, got, strict=True):
            lab = cc3d.connected_components((p > t) & o, connectivity=6)
            sizes = np.bincount(lab.ravel())[1:]
            assert n == int(np.sum(sizes >= min_piece)), (trial, t)


def test_h_maxima_and_reconstruction_equal_scikit_image():
    """The compiled grey reconstruction and the h-maxima built on it give scikit-image's voxels
    bit for bit: noise, distance maps with plateaus (the shape split's input), several depths."""
    import edt
    from skimage.morphology import h_maxima, reconstruction

    from cryoves.postprocess._label_kernels import reconstruct_by_dilation
    from cryoves.postprocess.adaptive import _h_maxima

    rng = np.random.default_rng(4)
    for trial in range(40):
        shape = tuple(int(v) for v in rng.integers(3, 24, 3))
        if trial % 4 == 0:
            img = rng.normal(size=shape)
        else:
            m = np.zeros(shape, np.uint8)
            zz, yy, xx = np.indices(shape)
            for _ in range(int(rng.integers(1, 5))):
                c, r = rng.uniform(0, shape), rng.uniform(2, 8)
                m[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r] = 1
            img = edt.edt(m, anisotropy=(1.5, 1.0, 1.0), black_border=True).astype(np.float64)
        h = float(rng.choice([0.3, 1.09, 2.0]))
        seed = img - h
        assert np.array_equal(reconstruct_by_dilation(seed, img), reconstruction(seed, img, method="dilation"))
        assert np.array_equal(_h_maxima(img, h), h_maxima(img, h).astype(bool)), trial


def test_objects_are_measured_once_and_updated_where_they_change(monkeypatch):
    """The labelling measures the whole volume once; the objects each step changes are measured in
    their boxes, with the numbers a whole-volume measurement gives (same labels and rejections)."""
    import cryoves.postprocess.adaptive as ad

    s = _scene([(20, 38, 32), (20, 38, 44)], radius=6.5)  # a merged pair among singles
    passes = []
    real = ad._objects
    monkeypatch.setattr(ad, "_objects", lambda labels: passes.append(1) or real(labels))
    labels, rej = label_vesicles(s.prob, 0.5, VS, min_radius_nm=4)
    assert len(passes) == 1
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 5, (12, 14, 16)).astype(np.uint32)
    box = (slice(0, 12), slice(0, 14), slice(0, 16))
    whole = {o.id: o for o in real(lab)}
    local = ad._objects_in(lab, box, range(1, 7))
    assert set(local) == set(whole)
    for i, o in whole.items():
        q = local[i]
        assert (q.volume, q.extent, q.box) == (o.volume, o.extent, o.box) and np.array_equal(q.centroid, o.centroid)


def test_objects_too_small_for_a_deep_voxel_are_not_examined_for_a_shape_split():
    """Below ``_voxels_within(d)`` voxels no voxel lies ``d`` deep (so the shape split finds nothing
    and is skipped); the ball of that depth has at least that many voxels."""
    from cryoves.postprocess.adaptive import _distance_inside, _voxels_within

    rng = np.random.default_rng(4)
    for d, zs in ((3.8, 1.5), (2.0, 1.0), (5.5, 1.5)):
        fewest = _voxels_within(d, zs)
        k = int(np.ceil(d)) + 2
        z, y, x = np.ogrid[-k : k + 1, -k : k + 1, -k : k + 1]
        ball = ((z * zs) ** 2 + y**2 + x**2 < d * d)
        deep = np.pad(ball, 1)
        assert _distance_inside(deep, zs).max() >= d - 1e-3 and ball.sum() >= fewest
        for _ in range(200):  # random blobs below the count: never that deep
            blob = np.zeros((2 * k + 3,) * 3, bool)
            c = rng.integers(k, k + 3, 3)
            r = rng.uniform(0.5, 1.2, 3) * d
            zz, yy, xx = np.indices(blob.shape)
            blob[(((zz - c[0]) * zs / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) < 1] = True
            blob &= rng.random(blob.shape) > rng.uniform(0, 0.1)
            if 0 < blob.sum() < fewest:
                assert _distance_inside(blob, zs).max() < d
