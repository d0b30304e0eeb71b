import numpy as np
import pytest

from cryoves.errors import InputError, ParameterError
from cryoves.postprocess import REJECTED_COLUMNS, restrict_probability, vesicles_in_region
from cryoves.vesicles import VesicleTable


def test_restrict_probability_zeroes_outside_and_keeps_input():
    rng = np.random.default_rng(0)
    prob = rng.random((6, 7, 8)).astype(np.float32)
    before = prob.copy()
    mask = np.zeros(prob.shape, np.uint8)
    mask[:, :3] = 1
    out = restrict_probability(prob, mask)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :3], prob[:, :3])
    assert not out[:, 3:].any()
    np.testing.assert_array_equal(prob, before)
    with pytest.raises(InputError):
        restrict_probability(prob, mask[:, :, :4])


def test_vesicles_in_region_really_removes_outside_ones():
    mask = np.zeros((40, 40, 40), bool)
    mask[:, :, :20] = True  # region: x < 20
    centres = [(20, 20, 8), (20, 20, 32), (20, 20, 19.5), (20, 20, 23)]
    t = VesicleTable.from_spheres(centres, [5, 5, 5, 5], 10.0)
    kept, rej = vesicles_in_region(t, mask, min_fraction=0.5)
    # inside; outside; centre at the edge (about half in); mostly outside
    assert list(kept.ids) == [1, 3]
    assert list(rej["id"]) == [2, 4] and set(rej["step"]) == {"region"}
    assert list(rej.columns) == REJECTED_COLUMNS
    assert rej["reason"].str.contains("inside the region").all()
    kept_all, _ = vesicles_in_region(t, mask, min_fraction=0.0)
    assert len(kept_all) == 4


def test_vesicle_partly_outside_volume_counts_missing_part_as_outside():
    mask = np.ones((30, 30, 30), bool)
    t = VesicleTable.from_spheres([(0, 15, 15), (15, 15, 15)], [6, 6], 10.0)
    kept, rej = vesicles_in_region(t, mask, min_fraction=0.6)
    assert list(kept.ids) == [2] and list(rej["id"]) == [1]


def test_bad_fraction():
    t = VesicleTable.from_spheres([(5, 5, 5)], [2], 10.0)
    with pytest.raises(ParameterError):
        vesicles_in_region(t, np.ones((10, 10, 10)), min_fraction=1.5)


def test_empty_rejected_table_has_string_columns():
    from cryoves.postprocess import concat_rejected

    empty = concat_rejected([])
    assert list(empty.columns) == REJECTED_COLUMNS and len(empty) == 0
    assert empty["reason"].str.len().sum() == 0  # the .str accessor works on an empty table
