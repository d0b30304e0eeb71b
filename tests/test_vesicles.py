"""The vesicle table: validation, CSV, rendering (overlap rule), labels → table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryoves.errors import FormatError, InputError, VoxelSizeError
from cryoves.vesicles import VesicleTable, labels_to_table, render_labels

RNG = np.random.default_rng(11)


def _table(n=6, vs=14.0, shape=(40, 50, 60)):
    centres = RNG.uniform(8, np.array(shape) - 8, size=(n, 3))
    radii = RNG.uniform(3, 6, size=n)
    return VesicleTable.from_spheres(centres, radii, vs, ids=np.arange(1, n + 1) * 3,
                                     membrane_thickness_nm=RNG.uniform(3, 5, n), source=["auto"] * n)


def test_nm_columns_follow_voxel_size():
    t = VesicleTable.from_spheres([[1.0, 2.0, 3.0]], [4.0], 14.69)
    row = t.df.iloc[0]
    assert row.z_nm == pytest.approx(1.469) and row.x_nm == pytest.approx(4.407)
    assert row.radius_nm == pytest.approx(5.876)
    assert list(t.df.columns[:9]) == ["id", "z", "y", "x", "radius", "z_nm", "y_nm", "x_nm", "radius_nm"]


def test_csv_roundtrip_keeps_qc_columns_and_voxel_size(tmp_path):
    t = _table()
    p = t.write_csv(tmp_path / "v.csv")
    back = VesicleTable.read_csv(p)
    assert back.voxel_size == pytest.approx(14.0, rel=1e-4)
    np.testing.assert_allclose(back.centres, t.centres, atol=1e-4)
    np.testing.assert_allclose(back.radii, t.radii, atol=1e-4)
    np.testing.assert_array_equal(back.ids, t.ids)
    assert list(back.df["source"]) == ["auto"] * len(t)
    np.testing.assert_allclose(back.df["membrane_thickness_nm"], t.df["membrane_thickness_nm"], atol=1e-4)


@pytest.mark.parametrize(
    "mutate, vs, err, match",
    [
        (lambda d: d.drop(columns=["radius"]), 14.0, FormatError, "lacks column"),
        (lambda d: d.assign(radius=-1.0), 14.0, FormatError, "radius <= 0"),
        (lambda d: d.assign(x=np.nan), 14.0, FormatError, "missing or non-numeric"),
        (lambda d: d.assign(id=1), 14.0, FormatError, "duplicate id"),
        (lambda d: d.assign(id=[0, 1, 2]), 14.0, FormatError, "positive"),
        (lambda d: d.assign(id=[10**30, 2, 3]), 14.0, FormatError, "integers below 2"),
        (lambda d: d.assign(fit_residual="abc"), 14.0, FormatError, "non-numeric value 'abc'"),
        (lambda d: d.assign(x_nm=d["x_nm"] * 1.5), None, FormatError, "disagree"),
        (lambda d: d.drop(columns=["z_nm", "y_nm", "x_nm", "radius_nm"]), None, VoxelSizeError, "--voxel-size"),
    ],
)
def test_csv_validated_on_load(tmp_path, mutate, vs, err, match):
    df = _table(n=3).df
    p = tmp_path / "bad.csv"
    mutate(df).to_csv(p, index=False)
    with pytest.raises(err, match=match):
        VesicleTable.read_csv(p, voxel_size=vs)


def test_csv_missing_and_garbage(tmp_path):
    with pytest.raises(InputError, match="not found"):
        VesicleTable.read_csv(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FormatError):
        VesicleTable.read_csv(tmp_path / "empty.csv")


def test_render_matches_brute_force_including_overlaps():
    shape = (30, 32, 34)
    centres = np.array([[10.3, 12.7, 14.2], [13.0, 15.0, 16.5], [25.0, 5.0, 30.5]])  # 1, 2 overlap; 3 clipped
    radii = np.array([5.2, 4.1, 6.0])
    ids = np.array([7, 3, 9])
    got = render_labels(centres, radii, ids, shape, dtype=np.uint16)
    grid = np.stack(np.indices(shape), axis=-1).astype(float)
    depth = np.stack([r - np.linalg.norm(grid - c, axis=-1) for c, r in zip(centres, radii)])
    depth[depth < 0] = -np.inf
    best = np.argmax(depth, axis=0)  # ties → earlier row
    want = np.where(np.isfinite(depth.max(axis=0)), ids[best], 0)
    np.testing.assert_array_equal(got, want)
    assert (got == 3).any() and (got == 7).any()


def test_render_leaves_other_values_and_checks_dtype():
    out = np.ones((10, 10, 10), np.uint16)
    render_labels([[5, 5, 5]], [2.0], [12], out.shape, out=out)
    assert out[5, 5, 5] == 12 and out[0, 0, 0] == 1
    with pytest.raises(FormatError, match="does not fit"):
        render_labels([[5, 5, 5]], [2.0], [70000], (10, 10, 10), dtype=np.uint16)


def test_labels_to_table_recovers_spheres():
    t = _table(n=5)
    labels = t.to_labels((40, 50, 60))
    back = labels_to_table(labels, t.voxel_size)
    order = np.argsort(back.ids)
    ref = np.argsort(t.ids)
    np.testing.assert_array_equal(back.ids[order], t.ids[ref])
    # overlaps can cut a ball; the non-overlapping ones come back within a fraction of a voxel
    d = np.linalg.norm(back.centres[order] - t.centres[ref], axis=1)
    assert np.median(d) < 0.2
    assert np.median(np.abs(back.radii[order] - t.radii[ref])) < 0.25


def test_labels_to_table_min_id_and_big_ids():
    labels = np.zeros((8, 8, 8), np.int64)
    labels[1:3, 1:3, 1:3] = 1
    labels[4:6, 4:6, 4:6] = 60_000_000_000
    t = labels_to_table(labels, 10.0)
    assert sorted(t.ids.tolist()) == [1, 60_000_000_000]
    assert labels_to_table(labels, 10.0, min_id=2).ids.tolist() == [60_000_000_000]
    np.testing.assert_allclose(t.centres[t.ids == 1][0], [1.5, 1.5, 1.5])
    assert len(labels_to_table(np.zeros((3, 3, 3), np.uint8), 10.0)) == 0
    with pytest.raises(InputError):
        labels_to_table(np.zeros((3, 3), np.uint8), 10.0)


def test_with_df_and_next_id():
    t = _table(n=3)
    assert t.next_id() == t.ids.max() + 1
    t2 = t.with_df(t.df.iloc[:1])
    assert len(t2) == 1 and t2.voxel_size == t.voxel_size
    assert VesicleTable.empty(10.0).next_id() == 1
    with pytest.raises(VoxelSizeError):
        VesicleTable(pd.DataFrame({"z": [1.0], "y": [1.0], "x": [1.0], "radius": [1.0]}), 0.0)


# pandas >= 3 warns (ChainedAssignmentError) on the writes through ``t.df`` below: they never work
@pytest.mark.filterwarnings("ignore::Warning")
def test_the_frame_is_read_only_outside_the_table_and_with_df_changes_it():
    t = _table()
    before = t.df
    d = t.df
    d.loc[0, "z"] = -99.0  # changes the copy handed out, never the table
    d.loc[d["id"] == 3, "source"] = "manual"
    d["extra"] = 1.0
    t.df.loc[1, "radius"] = 0.0
    t.df.at[2, "x"] = 0.0
    t.ids[0] = 1000
    pd.testing.assert_frame_equal(t.df, before)
    with pytest.raises(AttributeError):
        t.df = d  # no setter
    changed = t.with_df(d)
    assert changed.df.loc[0, "z"] == -99.0 and changed.df.loc[0, "z_nm"] == pytest.approx(-99.0 * 1.4)
    assert "extra" in changed.df.columns and t.df.loc[0, "z"] != -99.0


def test_the_table_carries_its_grid_through_with_df_and_renders_on_it():
    t = VesicleTable.from_spheres([[10.0, 10.0, 10.0]], [4.0], 14.0, shape=(20, 30, 40), origin=(1.0, 2.0, 3.5))
    assert t.shape == (20, 30, 40) and t.origin == (1.0, 2.0, 3.5)
    t2 = t.with_df(t.df.assign(radius=5.0))
    assert (t2.shape, t2.origin) == (t.shape, t.origin) and (t.copy().shape, t.copy().origin) == (t.shape, t.origin)
    assert t.to_labels().shape == (20, 30, 40) and t.to_labels((12, 12, 12)).shape == (12, 12, 12)
    assert VesicleTable(t.df, 14.0).shape is None  # the constructor's old signature still works
    with pytest.raises(InputError, match="grid shape"):
        VesicleTable.from_spheres([[1.0, 1.0, 1.0]], [1.0], 14.0).to_labels()
    with pytest.raises(InputError, match="grid shape"):
        VesicleTable.empty(14.0, shape=(0, 5, 5))
    with pytest.raises(InputError, match="origin"):
        VesicleTable.empty(14.0, origin=(0.0, np.nan, 0.0))
    assert labels_to_table(t.to_labels(), 14.0).shape == (20, 30, 40)


@pytest.mark.filterwarnings("ignore::Warning")
def test_rejected_table_validates_renumbers_and_round_trips(tmp_path):
    from cryoves.vesicles import REJECTED_COLUMNS, RejectedTable

    df = pd.DataFrame({"id": [7, 3, 9], "z": [5.0, 2.0, np.nan], "y": [1.0, 1.0, np.nan], "x": [1.0, 1.0, np.nan],
                       "radius": [2.0, 3.0, np.nan], "step": ["fit", "label", "fit"], "reason": ["a", "b", np.nan],
                       "feature": [0.1, 0.2, 0.3]})
    r = RejectedTable(df)
    assert list(r.df.columns) == REJECTED_COLUMNS + ["feature"] and r.df["reason"].iloc[2] == ""
    n = r.renumbered(11)
    assert list(n.ids) == [11, 12, 13] and list(n.df["step"]) == ["label", "fit", "fit"]  # (z, y, x), NaN last
    back = RejectedTable.read_csv(n.write_csv(tmp_path / "rejected.csv"))
    pd.testing.assert_frame_equal(back.df, n.df, check_dtype=False)
    assert len(RejectedTable.empty()) == 0 and list(RejectedTable.empty().df.columns) == REJECTED_COLUMNS
    r.df.loc[0, "id"] = 3
    assert list(r.ids) == [7, 3, 9]  # read-only like the vesicle table
    with pytest.raises(FormatError, match="duplicate id 3"):
        RejectedTable(df.assign(id=[3, 3, 4]))
    with pytest.raises(FormatError, match="positive"):
        RejectedTable(df.assign(id=[0, 1, 2]))
    with pytest.raises(FormatError, match="non-numeric"):
        RejectedTable(df.assign(z=["a", 1.0, 2.0]))
