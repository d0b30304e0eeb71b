"""Evaluation metrics on hand-made cases with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoves.cli import app
from cryoves.errors import InputError, VoxelSizeError
from cryoves.evaluate import (
    assign_one_to_one,
    dice,
    evaluate,
    match_centre,
    match_iou,
    soft_dice,
    sphere_iou,
    symmetric_best_dice,
)
from cryoves.io import Tomogram, write_mrc
from cryoves.vesicles import VesicleTable

VS = 10.0  # Å, so 1 voxel = 1 nm


def table(centres, radii, vs=VS):
    return VesicleTable.from_spheres(centres, radii, vs)


# ----------------------------------------------------------------- plain metrics
def test_sphere_iou_known_values():
    # equal unit balls one radius apart: lens = 5π/12, IoU = 5/27
    assert sphere_iou([0, 0, 0], 1.0, [0, 0, 1], 1.0) == pytest.approx(5 / 27)
    # concentric r and 2r: IoU = 1/8; disjoint: 0; identical: 1
    iou = sphere_iou([[0, 0, 0]] * 3, [1.0, 1.0, 2.0], [[0, 0, 0], [0, 0, 2.5], [0, 0, 0.0]], [2.0, 1.0, 2.0])
    np.testing.assert_allclose(iou, [1 / 8, 0.0, 1.0])


def test_sphere_iou_matches_voxel_count():
    a = table([[30, 30, 30]], [12])
    b = table([[30, 30, 37]], [10])
    la, lb = a.to_labels((60, 60, 60)) > 0, b.to_labels((60, 60, 60)) > 0
    voxel_iou = np.count_nonzero(la & lb) / np.count_nonzero(la | lb)
    assert sphere_iou([30, 30, 30], 12, [30, 30, 37], 10) == pytest.approx(voxel_iou, rel=0.03)


def test_dice_and_soft_dice_known_values():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2], b[1:3] = True, True  # 32 and 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))) == 1.0
    p = np.where(b, 0.5, 0.0)
    assert soft_dice(p, b) == pytest.approx(2 * 16 / (16 + 32))
    with pytest.raises(InputError):
        dice(a, b[:2])


# ----------------------------------------------------------------- protocols
def test_protocols_disagree_centre_inside_but_low_iou():
    # offset 8 voxels, both r=10: centre inside the GT, but IoU = 576/(8000/3 - 576) < 0.5
    gt = table([[30, 30, 30]], [10])
    pred = table([[30, 30, 38]], [10])
    m = evaluate(pred, gt).metrics
    assert (m["tp_centre"], m["fp_centre"], m["fn_centre"]) == (1, 0, 0)
    assert m["f1_centre"] == 1.0
    assert (m["tp_iou50"], m["f1_iou50"]) == (0, 0.0)
    expected_iou = 576 / (2 * 4000 / 3 - 576)
    assert evaluate(pred, gt).matches["iou"].iloc[0] == pytest.approx(expected_iou)


def test_centre_protocol_is_one_to_one_and_keeps_the_nearer():
    gt = table([[30, 30, 30]], [10])
    pred = table([[30, 30, 33], [30, 30, 24]], [10, 10])  # both centres inside; distances 3 and 6
    r = evaluate(pred, gt)
    assert (r.metrics["tp_centre"], r.metrics["fp_centre"]) == (1, 1)
    assert r.matches["pred_id"].tolist() == [1]
    assert r.false_positives["id"].tolist() == [2]
    assert r.metrics["precision_centre"] == pytest.approx(0.5)
    assert r.metrics["recall_centre"] == 1.0


def test_centre_matching_maximises_matches_not_greedy():
    # p1 lies inside A (dist 5) and B (dist 7); p2 only inside A (dist 3).
    # Greedy "each prediction takes its nearest GT" gives 1 match, the optimum is 2.
    gt = table([[30, 30, 20], [30, 30, 32]], [10, 10])
    pred = table([[30, 30, 25], [30, 30, 17]], [4, 4])
    pairs = match_centre(pred, gt)
    assert sorted(zip(pairs["pred_id"], pairs["gt_id"])) == [(1, 2), (2, 1)]
    assert evaluate(pred, gt).metrics["tp_centre"] == 2


def test_assign_one_to_one_prefers_cardinality_then_cost():
    # candidate edges: a0-b0 cost 0.1, a0-b1 cost 0.2, a1-b0 cost 0.3
    sel = assign_one_to_one(2, 2, np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3]))
    assert sel.tolist() == [1, 2]


def test_match_iou_threshold():
    gt = table([[20, 20, 20], [20, 20, 60]], [10, 10])
    pred = table([[20, 20, 21], [20, 20, 68]], [10, 10])  # IoU(d=1) high, IoU(d=8) ≈ 0.28
    m = match_iou(pred, gt)
    assert m[["pred_id", "gt_id"]].values.tolist() == [[1, 1]]
    assert match_iou(pred, gt, threshold=0.2).shape[0] == 2


def test_delta_d_and_delta_c_in_nm():
    gt = table([[30, 30, 30], [30, 30, 80]], [10, 10])
    pred = table([[30, 30, 33], [30, 30, 81]], [8, 10])
    m = evaluate(pred, gt).metrics
    assert m["delta_d"] == pytest.approx((0.2 + 0.0) / 2)
    assert m["delta_c_nm_mean"] == pytest.approx(2.0)
    assert m["delta_c_nm_sd"] == pytest.approx(1.0)
    # the same scene at 20 Å per voxel doubles every nm distance
    m2 = evaluate(table(pred.centres, pred.radii, 20.0), table(gt.centres, gt.radii, 20.0)).metrics
    assert m2["delta_c_nm_mean"] == pytest.approx(4.0)


def test_tables_of_different_binning_compare_in_nm():
    gt = table([[30, 30, 30], [30, 30, 80]], [10, 10])
    pred = table(gt.centres / 2, gt.radii / 2, 20.0)
    m = evaluate(pred, gt).metrics
    assert m["f1_centre"] == 1.0 and m["f1_iou50"] == 1.0
    assert m["delta_c_nm_mean"] == pytest.approx(0.0) and m["dice"] == pytest.approx(1.0)


def test_symmetric_best_dice_known_value():
    gt = table([[20, 20, 20], [20, 20, 60]], [8, 8])
    pred = table([[20, 20, 20]], [8])
    assert symmetric_best_dice(pred, gt) == pytest.approx(0.5)  # min(1, (1 + 0)/2)
    assert symmetric_best_dice(gt, gt) == pytest.approx(1.0)


def test_empty_sides():
    gt = table([[20, 20, 20]], [8])
    empty = VesicleTable.empty(VS)
    m = evaluate(empty, gt).metrics
    assert (m["recall_centre"], m["f1_centre"], m["f1_iou50"], m["n_pred"]) == (0.0, 0.0, 0.0, 0)
    assert math.isnan(m["delta_c_nm_mean"])
    m0 = evaluate(empty, VesicleTable.empty(VS)).metrics
    assert m0["f1_centre"] == 1.0 and m0["sbd"] == 1.0


# ----------------------------------------------------------------- voxel mode (labels)
SHAPE = (40, 64, 96)
GT_C = [[20, 20, 20], [20, 20, 50], [20, 44, 20], [20, 44, 75]]
PRED_C = [[20, 21, 20], [20, 20, 57], [20, 44, 76], [20, 10, 85]]


def _scene():
    gt = table(GT_C, [8, 8, 8, 7])
    pred = table(PRED_C, [8, 8, 7, 6])
    return pred, gt


def test_labels_and_tables_on_a_grid_agree_and_dice_is_voxel_dice():
    pred, gt = _scene()
    pl, gl = pred.to_labels(SHAPE), gt.to_labels(SHAPE)
    from_labels = evaluate(pl, gl, voxel_size=VS).metrics
    from_tables = evaluate(pred, gt, shape=SHAPE).metrics
    for key in ("tp_centre", "tp_iou50", "dice", "sbd", "n_pred", "n_gt"):
        assert from_labels[key] == pytest.approx(from_tables[key]), key
    assert from_labels["dice"] == pytest.approx(dice(pl, gl))
    assert from_labels["geometry"] == "voxels"
    assert (from_labels["tp_centre"], from_labels["fp_centre"], from_labels["fn_centre"]) == (3, 1, 1)
    # analytic spheres agree with the voxel numbers to within grid error
    analytic = evaluate(pred, gt).metrics
    assert analytic["geometry"] == "spheres"
    assert analytic["dice"] == pytest.approx(from_labels["dice"], abs=0.03)


def test_mixed_table_and_labels():
    pred, gt = _scene()
    gl = gt.to_labels(SHAPE)
    mixed = evaluate(pred, gl, voxel_size=VS).metrics
    ref = evaluate(pred, gt, shape=SHAPE).metrics
    assert mixed["tp_iou50"] == ref["tp_iou50"]
    assert mixed["dice"] == pytest.approx(ref["dice"])


def test_label_gt_centre_test_uses_the_label_not_a_sphere():
    # a long bar: the predicted centre lies inside it but far from its centroid
    gl = np.zeros((20, 20, 60), np.uint16)
    gl[8:12, 8:12, 10:50] = 5
    pred = table([[10, 10, 45]], [3])
    r = evaluate(pred, gl)
    assert r.metrics["tp_centre"] == 1
    assert r.matches["gt_id"].tolist() == [5]
    assert r.matches["centre_dist_nm"].iloc[0] == pytest.approx(math.sqrt(0.5 + 15.5**2))  # centroid (9.5, 9.5, 29.5)


def test_soft_dice_from_evaluate_matches_plain_soft_dice():
    pred, gt = _scene()
    gl = gt.to_labels(SHAPE)
    prob = np.where(gl > 0, 0.5, 0.0).astype(np.float32)
    prob[0, 0, :10] = 1.0  # some probability outside the GT
    expected = soft_dice(prob, gl)
    assert evaluate(pred, gt, prob=prob).metrics["dice_soft"] == pytest.approx(expected)
    assert evaluate(pred, gl, prob=prob, voxel_size=VS).metrics["dice_soft"] == pytest.approx(expected)


def test_mask_drops_vesicles_centred_outside():
    pred, gt = _scene()
    mask = np.zeros(SHAPE, bool)
    mask[:, :32, :] = True  # keeps GT 1, 2 and pred 1, 2, 4
    r = evaluate(pred, gt, mask=mask)
    assert (r.metrics["n_gt"], r.metrics["n_pred"]) == (2, 3)
    assert r.metrics["tp_centre"] == 2
    assert r.false_positives["id"].tolist() == [4]
    # voxel mode: only voxels inside the mask count
    pl, gl = pred.to_labels(SHAPE), gt.to_labels(SHAPE)
    rv = evaluate(pl, gl, mask=mask, voxel_size=VS)
    kept_p = np.isin(pl, [1, 2, 4]) & mask
    kept_g = np.isin(gl, [1, 2]) & mask
    assert rv.metrics["dice"] == pytest.approx(dice(kept_p, kept_g))


def test_bad_inputs():
    pred, gt = _scene()
    gl = gt.to_labels(SHAPE)
    with pytest.raises(VoxelSizeError):
        evaluate(gl, gl)  # bare arrays, no voxel size anywhere
    with pytest.raises(InputError):
        evaluate(pred, gl, mask=np.ones((2, 2, 2), bool))
    with pytest.raises(VoxelSizeError):
        # labels with a 10 Å header against a table on a 20 Å grid
        evaluate(table(pred.centres, pred.radii, 20.0), Tomogram(gl, (VS, VS, VS)))


def test_json_has_required_keys_and_no_nan(tmp_path):
    pred, gt = _scene()
    r = evaluate(pred, VesicleTable.empty(VS).with_df(gt.df.iloc[:0]))
    path = r.to_json(tmp_path / "m.json")
    text = path.read_text()
    assert "NaN" not in text
    obj = json.loads(text)
    for key in ("precision_centre", "recall_centre", "f1_centre", "f1_iou50", "sbd", "dice", "delta_d",
                "delta_c_nm_mean", "delta_c_nm_sd", "n_pred", "n_gt"):
        assert key in obj
    assert len(obj["false_positives"]) == 4


# ----------------------------------------------------------------- CLI
def test_cli_evaluate_csv_against_label_mrc(tmp_path):
    pred, gt = _scene()
    pred.write_csv(tmp_path / "pred.csv")
    write_mrc(tmp_path / "gt.mrc", gt.to_labels(SHAPE).astype(np.uint16), VS)
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "pred.csv"), str(tmp_path / "gt.mrc"), "--json", str(tmp_path / "m.json"),
            "-o", str(tmp_path / "ev")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "iou50" in res.output
    obj = json.loads((tmp_path / "m.json").read_text())
    assert (obj["n_pred"], obj["n_gt"], obj["f1_centre"]) == (4, 4, pytest.approx(0.75))
    assert (tmp_path / "ev" / "misses.csv").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def test_cli_evaluate_mask_and_prob_files(tmp_path):
    pred, gt = _scene()
    pred.write_csv(tmp_path / "pred.csv")
    gt.write_csv(tmp_path / "gt.csv")
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :32, :] = 1
    gl = gt.to_labels(SHAPE)
    prob = np.where(gl > 0, 0.5, 0.0).astype(np.float32)
    write_mrc(tmp_path / "mask.mrc", mask, VS)
    write_mrc(tmp_path / "prob.mrc", prob, VS)
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred.csv"), str(tmp_path / "gt.csv"),
                                   "--mask", str(tmp_path / "mask.mrc"), "--prob", str(tmp_path / "prob.mrc"),
                                   "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    obj = json.loads((tmp_path / "m.json").read_text())
    assert (obj["n_gt"], obj["n_pred"], obj["geometry"]) == (2, 3, "spheres")
    kept = np.isin(gl, [1, 2]) & (mask > 0)
    assert obj["dice_soft"] == pytest.approx(soft_dice(prob * (mask > 0), kept))


def test_cli_pyto_labels_cytoplasm_and_az_are_not_vesicles(tmp_path):
    from cryoves.io.pyto import write_pyto_labels

    pred, gt = _scene()
    pred.write_csv(tmp_path / "pred.csv")
    cyto = np.ones(SHAPE, bool)
    az = np.zeros(SHAPE, bool)
    az[:, :2] = True
    write_pyto_labels(tmp_path / "gt.mrc", gt, SHAPE, cytoplasm=cyto, active_zone=az)
    runner = CliRunner()
    base = ["evaluate", str(tmp_path / "pred.csv"), str(tmp_path / "gt.mrc")]
    res = runner.invoke(app, base + ["--json", str(tmp_path / "a.json")])  # the .ids.json sidecar says 10
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a.json").read_text())["n_gt"] == 4
    (tmp_path / "gt.ids.json").unlink()
    res = runner.invoke(app, base + ["--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["n_gt"] == 6  # 1 and 2 counted as vesicles
    res = runner.invoke(app, base + ["--min-label", "10", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())["n_gt"] == 4


def test_huge_label_ids_are_kept(monkeypatch):
    import cryoves.evaluate as ev

    monkeypatch.setattr(ev, "_MAX_DIRECT_ID", 100)  # force the renumbering path on a small volume
    pred, gt = _scene()
    gl = gt.to_labels(SHAPE).astype(np.int64) * 1000
    r = evaluate(pred, gl, voxel_size=VS)
    ref = evaluate(pred, gt, shape=SHAPE)
    assert r.metrics["tp_centre"] == ref.metrics["tp_centre"]
    assert r.metrics["dice"] == pytest.approx(ref.metrics["dice"])
    assert sorted(r.matches["gt_id"]) == sorted(ref.matches["gt_id"] * 1000)
