"""The vesicle editor's GUI-free logic (cryoves.napari._session): no napari/Qt needed."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import mrcfile
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _napari_utils import SHAPE, TRUTH, VOXEL_SIZE_A, fake_segment_output, phantom, truth_table
from cryoves.errors import FormatError, OutputExistsError, ParameterError
from cryoves.napari._session import RECOVERY_NAME, EditSession, load_result, qc_scores
from cryoves.vesicles import VesicleTable


def _fixed_fitter(centre, radius):
    calls = []

    def fit(volume, c, r, vs):
        calls.append((tuple(c), r, vs))
        return SimpleNamespace(centre=np.asarray(centre, float), radius=radius, converged=True, fit_residual=0.1)

    fit.calls = calls
    return fit


def _session(table=None, **kw):
    kw.setdefault("fitter", None)
    return EditSession(table if table is not None else truth_table(), SHAPE, **kw)


def _assert_rendered(s: EditSession):
    np.testing.assert_array_equal(s.labels, s.table.to_labels(s.shape))


def test_import_does_not_pull_in_gui():
    code = (
        "import sys, cryoves.napari, cryoves.napari._session; "
        "print(any(m in sys.modules for m in ('napari', 'qtpy', 'PyQt5')))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_labels_stay_a_rendering_of_the_table_through_random_edits():
    rng = np.random.default_rng(1)
    s = _session()
    for _ in range(40):
        ids = list(s.table.ids)
        op = rng.integers(6)
        if op == 0 or not ids:
            # overlapping additions exercise the overlap rule inside the re-rendered box
            s.add(rng.uniform(5, np.array(SHAPE) - 5), radius=rng.uniform(3, 10), fit=False)
        elif op == 1:
            s.delete(int(rng.choice(ids)))
        elif op == 2:
            s.nudge(int(rng.choice(ids)), rng.normal(0, 2, 3))
        elif op == 3:
            s.set_radius(int(rng.choice(ids)), rng.uniform(2, 12))
        elif op == 4:
            s.undo()
        else:
            s.redo()
        _assert_rendered(s)
    assert s.last_box is not None
    lo, hi = map(np.array, s.last_box)
    assert np.prod(hi - lo) < np.prod(SHAPE)  # only a box was re-rendered


def test_add_uses_the_fit_and_falls_back_to_a_manual_sphere():
    fit = _fixed_fitter((20.5, 30.2, 31.0), 6.5)
    s = _session(tomogram=np.zeros(SHAPE, np.float32), fitter=fit)
    vid = s.add((20, 30, 30))
    row = s.row(vid)
    assert (row["z"], row["y"], row["x"], row["radius"]) == (20.5, 30.2, 31.0, 6.5)
    assert row["source"] == "fitted" and row["fit_residual"] == 0.1
    assert fit.calls[0][2] == VOXEL_SIZE_A and fit.calls[0][1] == pytest.approx(np.median(TRUTH[:, 3]))

    for bad in (lambda *a: None, lambda *a: 1 / 0, _fixed_fitter((20, 30, 30), 40.0), _fixed_fitter((5, 5, 5), 8.0)):
        s.fitter = bad
        vid = s.add((21, 31, 32), radius=7.0)
        row = s.row(vid)
        assert row["source"] == "manual" and row["radius"] == 7.0 and (row["z"], row["y"], row["x"]) == (21, 31, 32)
    assert s.counts()["manual"] == 4 and s.counts()["added"] == 5


def test_add_with_the_real_fit_recovers_a_missing_vesicle():
    pytest.importorskip("cryoves.postprocess.spheres")
    missing = TRUTH[2]
    s = EditSession(truth_table(np.delete(TRUTH, 2, axis=0)), SHAPE, tomogram=phantom())
    vid = s.add(missing[:3] + [1.0, -1.5, 1.2])
    row = s.row(vid)
    assert row["source"] == "fitted"
    assert np.linalg.norm(row[["z", "y", "x"]].to_numpy(float) - missing[:3]) < 0.5
    assert abs(row["radius"] - missing[3]) < 0.5


def test_delete_undo_redo_restore_table_and_labels_exactly():
    s = _session()
    df0, lab0 = s.table.df.copy(), s.labels.copy()
    s.delete(2)
    assert 2 not in s.table.ids and not (s.labels == 2).any()
    lab1 = s.labels.copy()
    assert s.undo() == "delete 2"
    pd.testing.assert_frame_equal(s.table.df, df0)
    np.testing.assert_array_equal(s.labels, lab0)
    assert s.redo() == "delete 2"
    np.testing.assert_array_equal(s.labels, lab1)
    assert s.redo() is None and s.can_undo
    s.undo()
    s.set_radius(1, 5.0)  # a new edit clears the redo stack
    assert not s.can_redo


def test_edits_validate_their_input():
    s = _session()
    with pytest.raises(ParameterError, match="no vesicle with id 99"):
        s.delete(99)
    with pytest.raises(ParameterError, match="outside the tomogram"):
        s.add((100, 0, 0))
    with pytest.raises(ParameterError, match="radius"):
        s.set_radius(1, 0.0)
    assert not s.can_undo


def test_move_and_radius_edits_mark_auto_vesicles_edited():
    s = _session()
    s.move(1, (21, 17, 15))
    s.set_radius(1, 6.0)
    row = s.row(1)
    assert (row["z"], row["y"], row["x"], row["radius"], row["source"]) == (21, 17, 15, 6.0, "edited")
    assert row["radius_nm"] == pytest.approx(6.0 * VOXEL_SIZE_A / 10)
    assert s.vesicle_at((21, 17, 15)) == 1 and s.vesicle_at((21, 17, 22)) is None


def test_refit_uses_the_current_sphere_and_keeps_it_when_the_fit_fails():
    fit = _fixed_fitter((20.2, 16.1, 16.3), 8.2)
    s = _session(tomogram=np.zeros(SHAPE, np.float32), fitter=fit)
    s.set_radius(1, 7.0)
    assert s.refit(1)
    assert fit.calls[-1][1] == 7.0 and s.row(1)["radius"] == 8.2
    s.fitter = lambda *a: None
    assert not s.refit(1) and s.row(1)["radius"] == 8.2


def test_qc_scores_follow_the_pipeline_limits():
    df = pd.DataFrame({"mahalanobis": [8.0, 1.0, np.nan, np.nan], "profile_correlation": [0.9, 0.3, np.nan, 0.65]})
    np.testing.assert_allclose(qc_scores(df), [2.0, 1.0, 0.0, 0.5])
    assert qc_scores(pd.DataFrame({"id": [1, 2]})).tolist() == [0.0, 0.0]


def test_review_queue_order_accept_reject_and_restore():
    table = truth_table(mahalanobis=[1.0, 6.0, 2.0, 0.5], profile_correlation=[0.9, 0.9, 0.2, 0.95])
    rejected = pd.DataFrame(
        {
            "id": [7, 8],
            "z": [10.0, np.nan],
            "y": [30.0, np.nan],
            "x": [30.0, np.nan],
            "radius": [6.0, np.nan],
            "step": ["outliers", "size"],
            "reason": ["mahalanobis 5.1", "too small"],
        }
    )
    s = _session(table, rejected=rejected)
    q = s.review_queue()
    assert [(i.kind, i.key) for i in q] == [
        ("rejected", 0),
        ("vesicle", 2),
        ("vesicle", 3),
        ("vesicle", 1),
        ("vesicle", 4),
    ]
    assert s.counts()["queue"] == 5
    vid = s.accept(q[0])  # restores the rejected candidate with its id
    assert vid == 7 and s.row(7)["source"] == "restored" and len(s.rejected) == 1
    s.reject(q[1])
    assert 2 not in s.table.ids and s.rejected.iloc[-1]["reason"] == "rejected in review"
    s.accept(q[2])
    assert s.row(3)["review"] == "accepted"
    assert [(i.kind, i.key) for i in s.review_queue()] == [("vesicle", 1), ("vesicle", 4)]
    # a vesicle rejected in review can be restored
    idx = int(np.flatnonzero(s.rejected["id"] == 2)[0])
    assert s.restore(idx) == 2 and 2 in s.table.ids
    _assert_rendered(s)
    for _ in range(4):
        s.undo()
    assert len(s.table) == 4 and len(s.rejected) == 2
    _assert_rendered(s)


def test_autosave_and_recovery_after_a_crash(tmp_path):
    rec = tmp_path / RECOVERY_NAME
    s = _session(
        recovery_path=rec,
        rejected=pd.DataFrame(
            {"id": [9], "z": [5.0], "y": [5.0], "x": [5.0], "radius": [3.0], "step": ["x"], "reason": ["y"]}
        ),
    )
    s.add((30, 30, 30), radius=5.0, fit=False)
    s.delete(1)
    s.set_radius(2, 7.25)
    assert rec.exists()
    df, rej, labels, sid = s.table.df.copy(), s.rejected.copy(), s.labels.copy(), s.session_id
    del s  # the crash: nothing but the recovery file survives
    r = EditSession.recover(rec, fitter=None)
    assert r.session_id == sid and r.recovery_path == rec
    pd.testing.assert_frame_equal(r.table.df, df, check_dtype=False)
    pd.testing.assert_frame_equal(r.rejected, rej, check_dtype=False)
    np.testing.assert_array_equal(r.labels, labels)


def test_recover_refuses_a_corrupt_file(tmp_path):
    bad = tmp_path / RECOVERY_NAME
    bad.write_text('{"format": "something else"}')
    with pytest.raises(FormatError, match="delete it"):
        EditSession.recover(bad)


def test_save_writes_all_formats_and_protects_the_automatic_result(tmp_path):
    out = fake_segment_output(tmp_path / "auto", truth_table(), phantom())
    s, tomo = load_result(out, fitter=None)
    assert tomo is not None and tomo.shape == SHAPE and s.source_dir == out
    s.delete(3)
    with pytest.raises(OutputExistsError, match="automatic result"):
        s.save(out)
    written = s.save()  # default: <result>/reviewed
    target = out / "reviewed"
    assert written["csv"] == target / "vesicles.csv"
    for name in ("vesicles.csv", "rejected.csv", "labels.mrc", "manifest.json"):
        assert (target / name).exists()
    for name in ("vesicles.mod", "vesicles.star", "pyto_labels.mrc"):  # exporters of the core package
        assert (target / name).exists()
    with mrcfile.open(target / "labels.mrc") as m:
        np.testing.assert_array_equal(m.data, s.labels)
        assert m.voxel_size.x == pytest.approx(VOXEL_SIZE_A)
    saved = VesicleTable.read_csv(target / "vesicles.csv")
    assert sorted(saved.ids) == [1, 2, 4]
    s.set_radius(1, 6.0)
    s.save()  # re-saving our own review is allowed
    other, _ = load_result(out, recover=False, fitter=None)
    with pytest.raises(OutputExistsError, match="another session"):
        other.save()
    other.save(force=True)
    meta = json.loads((target / "manifest.json").read_text())
    assert meta["kind"] == "review" and meta["inputs"]["voxel_size_a"] == VOXEL_SIZE_A
    # a re-opened review saves in place without force
    again, _ = load_result(target, fitter=None)
    again.set_radius(1, 5.5)
    assert again.save()["csv"] == target / "vesicles.csv"
    assert VesicleTable.read_csv(target / "vesicles.csv").df.set_index("id").loc[1, "radius"] == 5.5
    # the automatic result itself is untouched
    assert sorted(VesicleTable.read_csv(out / "vesicles.csv").ids) == [1, 2, 3, 4]


def test_load_result_prefers_a_recovery_file(tmp_path):
    out = fake_segment_output(tmp_path / "auto", truth_table(), phantom())
    s, _ = load_result(out, fitter=None)
    s.delete(1)
    s2, _ = load_result(out, fitter=None)
    assert sorted(s2.table.ids) == [2, 3, 4] and s2.session_id == s.session_id
    s3, _ = load_result(out, recover=False, fitter=None)
    assert sorted(s3.table.ids) == [1, 2, 3, 4]
    s2.discard_recovery()
    assert not (out / RECOVERY_NAME).exists()


def test_flagged_vesicles_are_reviewed_first_and_rank_first_in_the_report():
    from cryoves.vesicles import qc_score

    table = truth_table(mahalanobis=[1.0, 6.0, 2.0, 0.5], profile_correlation=[0.9, 0.9, 0.2, 0.95],
                        flags=["", "", "", "Mahalanobis outlier (p = 1e-09)"])
    s = _session(table)
    assert [i.key for i in s.review_queue()] == [4, 2, 3, 1]
    assert np.argmax(qc_score(table.df)) == 3
