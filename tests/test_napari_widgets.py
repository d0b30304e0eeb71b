"""Drive the real napari widgets headless (xvfb): click, keys, worker, save, reload, recovery.

Run with a display, e.g. ``QT_QPA_PLATFORM=xcb xvfb-run -a python -m pytest tests/test_napari_widgets.py``
(or with the pytest-xvfb plugin installed). See .ci/gui-deps.sh for the system packages.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install 'cryoves[napari]' pytest-qt")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed: pip install pytest-qt")
if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    # Qt aborts the whole test process without a display, so skip before any viewer is made
    pytest.skip(
        "no display: run .ci/gui-deps.sh and pip install pytest-xvfb, or use 'xvfb-run -a'", allow_module_level=True
    )

sys.path.insert(0, str(Path(__file__).parent))
from _napari_utils import TRUTH, VOXEL_SIZE_A, fake_segment_output, phantom, truth_table
from cryoves.napari._session import RECOVERY_NAME
from cryoves.vesicles import VesicleTable

pytestmark = [
    pytest.mark.gui,
    pytest.mark.filterwarnings("ignore:System theme detection requires a Qt6 backend:UserWarning"),
]

MISSING = 2  # row of TRUTH left out of the "automatic" result
FALSE = np.array([[20.0, 30.0, 32.0, 6.0]])  # a false positive in empty background


@pytest.fixture
def result_dir(tmp_path):
    auto = np.vstack([np.delete(TRUTH, MISSING, axis=0), FALSE])
    return fake_segment_output(tmp_path / "auto", truth_table(auto), phantom())


def _editor(viewer):
    from cryoves.napari._widgets import VesicleEditorWidget

    editor = VesicleEditorWidget(viewer)
    viewer.window.add_dock_widget(editor, name="Vesicle editor")
    return editor


def _click(viewer, qtbot, world_point, modifiers):
    """A real mouse press/release through vispy and napari at ``world_point`` (nm, z y x)."""
    from vispy.util import keys

    viewer.dims.set_point(0, world_point[0])
    from cryoves.napari._widgets import camera

    camera(viewer).center = tuple(world_point)
    camera(viewer).zoom = 8.0
    qtbot.wait(10)
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    pos = (canvas.size[0] / 2, canvas.size[1] / 2)
    mods = tuple(getattr(keys, m.upper()) for m in modifiers)
    canvas.events.mouse_press(pos=pos, modifiers=mods, button=1)
    canvas.events.mouse_release(pos=pos, modifiers=mods, button=1)


def _wheel(viewer, delta, modifiers):
    from vispy.util import keys

    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    pos = (canvas.size[0] / 2, canvas.size[1] / 2)
    canvas.events.mouse_wheel(pos=pos, delta=(0.0, delta), modifiers=tuple(getattr(keys, m.upper()) for m in modifiers))


def _press(viewer, key):
    viewer.window._qt_viewer.canvas._key_map_handler.press_key(key)


def test_reader_opens_tomogram_with_scale_and_result_layers(make_napari_viewer, result_dir):
    viewer = make_napari_viewer()
    tomo_path = result_dir.parent / "auto_tomo.mrc"
    layers = viewer.open(tomo_path, plugin="cryoves")
    assert len(layers) == 1 and layers[0].scale.tolist() == pytest.approx([VOXEL_SIZE_A / 10] * 3)
    layers = viewer.open(result_dir, plugin="cryoves")
    kinds = {type(lyr).__name__ for lyr in layers}
    assert {"Image", "Labels", "Points"} <= kinds
    pts = next(lyr for lyr in layers if type(lyr).__name__ == "Points")
    table = VesicleTable.read_csv(result_dir / "vesicles.csv")
    np.testing.assert_allclose(pts.data, table.centres)
    np.testing.assert_allclose(pts.size, 2 * table.radii)


def test_click_add_delete_undo_redo_save_reload(make_napari_viewer, qtbot, result_dir):
    viewer = make_napari_viewer(show=True)
    editor = _editor(viewer)
    editor.open_result(result_dir)
    s = editor.session
    nm = VOXEL_SIZE_A / 10
    assert len(s.table) == 4 and editor.labels_layer.data is s.labels

    # add: shift+click off-centre on the missing vesicle; the fit recovers the true sphere
    truth = TRUTH[MISSING]
    _click(viewer, qtbot, (truth[:3] + [0.0, 1.4, -1.2]) * nm, ["Shift"])
    assert len(s.table) == 5
    row = s.table.df.iloc[-1]
    assert row["source"] == "fitted"
    assert np.linalg.norm(row[["z", "y", "x"]].to_numpy(float) - truth[:3]) < 0.5
    assert abs(row["radius"] - truth[3]) < 0.5
    z = int(round(truth[0]))
    # the labels layer shows the new sphere on the current slice
    assert (editor.labels_layer._slice.image.raw == row["id"]).any()
    assert "vesicles: 5" in editor.counts_label.text()

    # delete the false positive with ctrl+shift+click
    false_id = int(s.table.df.iloc[3]["id"])
    _click(viewer, qtbot, FALSE[0, :3] * nm, ["Control", "Shift"])
    assert false_id not in s.table.ids and not (s.labels == false_id).any()

    # undo / redo through the key bindings of the active layer
    _press(viewer, "Control-Z")
    assert false_id in s.table.ids and (s.labels[z] == false_id).any()
    _press(viewer, "Control-Shift-Z")
    assert false_id not in s.table.ids
    np.testing.assert_array_equal(s.labels, s.table.to_labels(s.shape))

    # select + grow the radius with keys, then save and reload the saved folder
    _click(viewer, qtbot, TRUTH[0, :3] * nm, ["Control"])
    assert editor.selected == 1
    _press(viewer, "Shift-Up")
    assert s.row(1)["radius"] == pytest.approx(TRUTH[0, 3] + 0.5)
    _wheel(viewer, -1.0, ["Shift"])
    assert s.row(1)["radius"] == pytest.approx(TRUTH[0, 3])
    _click(viewer, qtbot, (TRUTH[0, :3] + [0.0, 0.0, 1.0]) * nm, ["Control", "Alt"])  # move the selected centre
    assert s.row(1)["x"] == pytest.approx(TRUTH[0, 2] + 1.0, abs=0.2)
    _press(viewer, "Control-Z")
    assert s.row(1)["x"] == TRUTH[0, 2]
    assert not editor.labels_layer.editable  # no painting behind the table's back
    written = editor.save()
    assert written is not None and not (result_dir / RECOVERY_NAME).exists()
    reloaded = VesicleTable.read_csv(result_dir / "reviewed" / "vesicles.csv")
    np.testing.assert_allclose(reloaded.centres, s.table.centres, atol=1e-3)
    np.testing.assert_allclose(reloaded.radii, s.table.radii, atol=1e-3)
    editor2 = _editor(viewer)
    editor2.open_result(result_dir / "reviewed")
    np.testing.assert_array_equal(editor2.session.labels, s.labels)


def test_review_queue_keys_and_restore(make_napari_viewer, qtbot, tmp_path):
    import pandas as pd

    table = truth_table(TRUTH, mahalanobis=[1.0, 6.0, 0.5, 0.2])
    rejected = pd.DataFrame(
        {
            "id": [9],
            "z": [20.0],
            "y": [30.0],
            "x": [32.0],
            "radius": [6.0],
            "step": ["outliers"],
            "reason": ["mahalanobis 5"],
        }
    )
    out = fake_segment_output(tmp_path / "auto", table, phantom(), rejected=rejected)
    viewer = make_napari_viewer()
    editor = _editor(viewer)
    editor.open_result(out)
    _press(viewer, "N")
    assert editor.current.kind == "rejected"
    assert viewer.dims.point[0] == pytest.approx(20.0 * VOXEL_SIZE_A / 10)
    _press(viewer, "R")  # keep it rejected; the next item is the worst vesicle
    assert editor.current.kind == "vesicle" and editor.current.key == 2
    _press(viewer, "R")
    assert 2 not in editor.session.table.ids
    _press(viewer, "K")
    assert editor.session.row(1)["review"] == "accepted"
    assert "to review: 2" in editor.counts_label.text()
    # a vesicle rejected in review can be restored from the queue of rejected candidates
    editor.session.restore(int(np.flatnonzero(editor.session.rejected["id"] == 2)[0]))
    assert 2 in editor.session.table.ids


def test_recovery_after_a_simulated_crash(make_napari_viewer, qtbot, result_dir):
    viewer = make_napari_viewer()
    editor = _editor(viewer)
    editor.open_result(result_dir)
    editor.add_at(TRUTH[MISSING, :3])
    editor.delete_at(FALSE[0, :3])
    expected = editor.session.table.df.copy()
    # crash: the viewer goes away without saving; only the recovery file is left
    viewer2 = make_napari_viewer()
    editor2 = _editor(viewer2)
    editor2.open_result(result_dir)
    assert "recovered" in editor2.status_label.text()
    np.testing.assert_allclose(editor2.session.table.centres, expected[["z", "y", "x"]].to_numpy(float))
    np.testing.assert_array_equal(editor2.session.labels, editor.session.labels)
    # the automatic result is never overwritten without asking
    assert editor2.save(result_dir) is None and "automatic result" in editor2.status_label.text()


def _fake_segment(delay=0.05, steps=20):
    """Stands in for cryoves.pipeline.segment: reports progress, honours should_stop."""

    def segment(tomo, outdir, config, *, force=False, progress=None, should_stop=None):
        for i in range(steps):
            if should_stop():
                from cryoves.errors import Cancelled

                raise Cancelled("segmentation cancelled")
            progress("predict", (i + 1) / steps)
            time.sleep(delay)
        table = truth_table(np.delete(TRUTH, MISSING, axis=0), source="auto")
        return SimpleNamespace(
            vesicles=table,
            rejected=None,
            probability=np.zeros(tomo.shape, np.float32),
            labels=table.to_labels(tomo.shape),
            outdir=None,
        )

    return segment


def _segment_widget(viewer, monkeypatch, fn):
    from cryoves.napari._widgets import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    monkeypatch.setattr(widget, "segment_function", lambda: fn)
    monkeypatch.setattr(widget, "config", lambda: SimpleNamespace())
    return widget


def test_segment_widget_runs_in_a_worker_with_progress(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(phantom(), name="tomo", scale=(VOXEL_SIZE_A / 10,) * 3)
    widget = _segment_widget(viewer, monkeypatch, _fake_segment())
    seen = []
    widget._progress.changed.connect(lambda stage, f: seen.append(f))
    worker = widget.run()
    assert worker is not None and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert seen and seen[-1] == 1.0 and widget.progress.value() == 1000
    assert widget.editor is not None and len(widget.editor.session.table) == 3
    names = [lyr.name for lyr in viewer.layers]
    assert "vesicles" in names and "vesicle probability" in names
    assert widget.editor.session.tomogram is viewer.layers["tomo"].data  # fits use the open tomogram


def test_segment_widget_needs_a_voxel_size(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(phantom(), name="tomo")  # napari's default scale 1: unknown voxel size
    widget = _segment_widget(viewer, monkeypatch, _fake_segment())
    assert widget.run() is None and "voxel size" in widget.status_label.text()
    widget.voxel_size.setValue(VOXEL_SIZE_A)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert widget.result is not None


def test_segment_widget_cancel(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(phantom(), name="tomo", scale=(VOXEL_SIZE_A / 10,) * 3)
    widget = _segment_widget(viewer, monkeypatch, _fake_segment(delay=0.2, steps=100))
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=10_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert widget.status_label.text() == "cancelled" and widget.editor is None


WEIGHTS = Path(__file__).parents[2] / "shared" / "reference" / "weights.h5"


@pytest.mark.slow
def test_segment_widget_real_pipeline(make_napari_viewer, qtbot, tmp_path):
    pipeline = pytest.importorskip("cryoves.pipeline", reason="cryoves.pipeline is not available yet")
    if not hasattr(pipeline, "segment"):
        pytest.skip("cryoves.pipeline.segment is not available yet")
    sim = pytest.importorskip("cryoves.simulate")
    if not WEIGHTS.exists():
        pytest.skip(f"reference weights not found at {WEIGHTS}")
    from cryoves.napari._widgets import SegmentWidget

    s = sim.simulate(sim.SimulationConfig.preset("small"), 0)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(
        np.asarray(s.tomogram.data),
        name="sim",
        scale=tuple(v / 10 for v in s.tomogram.voxel_size),
        metadata={"voxel_size_a": tuple(s.tomogram.voxel_size)},
    )
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.outdir.setText(str(tmp_path / "seg"))
    widget.device.setCurrentText("cpu")
    widget.model.setText(str(WEIGHTS))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    assert widget.result is not None, widget.status_label.text()
    assert len(widget.editor.session.table) > 0 and (tmp_path / "seg" / "vesicles.csv").exists()

    # make a ground-truth vesicle "missing", then add it back with a click: the fit must find it
    session, gt = widget.editor.session, s.vesicles
    target = int(np.argmax(np.min(np.minimum(gt.centres, np.array(s.tomogram.shape) - gt.centres), axis=1)))
    c, r = gt.centres[target], gt.radii[target]
    for vid in [int(v) for v in session.table.ids]:
        if np.linalg.norm(session.row(vid)[["z", "y", "x"]].to_numpy(float) - c) < r:
            session.delete(vid)
    n = len(session.table)
    _click(viewer, qtbot, (c + [0.0, 1.0, -1.0]) * s.tomogram.voxel_size_a / 10, ["Shift"])
    assert len(session.table) == n + 1, widget.editor.status_label.text()
    row = session.table.df.iloc[-1]
    assert row["source"] == "fitted", (c, r, widget.editor.status_label.text())
    err_c, err_r = np.linalg.norm(row[["z", "y", "x"]].to_numpy(float) - c), abs(row["radius"] - r)
    assert err_c < 1.0 and err_r < 1.0, (err_c, err_r)


def test_open_review_shows_the_editor(make_napari_viewer, result_dir):
    from cryoves.napari._widgets import open_review

    viewer = make_napari_viewer()
    _, editor = open_review(result_dir, viewer=viewer, block=False)
    assert len(editor.session.table) == 4
    assert {"vesicles", "vesicles (spheres)", "auto_tomo"} <= {lyr.name for lyr in viewer.layers}
    assert "Shift+click" in editor.shortcuts_label.text() and "Control-Z" in editor.shortcuts_label.text()


def test_segment_widget_config_carries_the_radius_range(make_napari_viewer):
    from cryoves.napari._widgets import SegmentWidget

    widget = SegmentWidget(make_napari_viewer())
    assert widget.config().radius_range_nm == (12.0, 90.0)
    widget.min_radius.setValue(30.0)
    widget.max_radius.setValue(150.0)
    cfg = widget.config()
    assert cfg.radius_range_nm == (30.0, 150.0) and cfg.vesicle_radius_nm is None
