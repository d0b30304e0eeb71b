"""napari widgets: the segmentation form (runs in a worker thread) and the vesicle editor.

The editor is a thin view over :class:`cryoves.napari._session.EditSession`: every mouse or key
action calls one session method; the session re-renders the labels box of the changed vesicle
and the widget refreshes the layers. Layers are in nm (scale = voxel size); the session in voxels.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from cryoves import DEFAULT_MODEL
from cryoves.errors import CryovesError, VoxelSizeError
from cryoves.napari._reader import points_kwargs, robust_contrast_limits, source_colours
from cryoves.napari._session import RECOVERY_NAME, EditSession, QueueItem, load_result
from cryoves.results import is_result_folder

log = logging.getLogger(__name__)

#: (key, action, description) — bound on the editor's layers; shown in the widget.
KEYS = [
    ("N", "next_item", "next in review queue"),
    ("Shift-N", "previous_item", "previous in review queue"),
    ("K", "accept_current", "keep: accept / restore the current item"),
    ("R", "reject_current", "reject the current item"),
    ("D", "delete_selected", "delete the selected vesicle"),
    ("T", "refit_selected", "refit the selected vesicle"),
    ("Shift-Up", "grow_selected", "radius +0.5 voxel"),
    ("Shift-Down", "shrink_selected", "radius -0.5 voxel"),
    ("Control-Shift-Up", "move_up", "move selected centre -y"),
    ("Control-Shift-Down", "move_down", "move selected centre +y"),
    ("Control-Shift-Left", "move_left", "move selected centre -x"),
    ("Control-Shift-Right", "move_right", "move selected centre +x"),
    ("Control-Shift-PageUp", "move_zup", "move selected centre +z"),
    ("Control-Shift-PageDown", "move_zdown", "move selected centre -z"),
    ("Control-Z", "undo", "undo"),
    ("Control-Shift-Z", "redo", "redo"),
]
MOUSE_HELP = [
    ("Shift+click", "add a vesicle (radial-profile fit; manual sphere if it fails)"),
    ("Ctrl+click", "select a vesicle"),
    ("Ctrl+Shift+click", "delete the vesicle under the cursor"),
    ("Ctrl+Alt+click", "move the selected centre here"),
    ("Shift+wheel", "change the selected radius"),
]
RADIUS_STEP = 0.5
_MOVES = {
    "move_up": (0, -1, 0),
    "move_down": (0, 1, 0),
    "move_left": (0, 0, -1),
    "move_right": (0, 0, 1),
    "move_zup": (1, 0, 0),
    "move_zdown": (-1, 0, 0),
}


def camera(viewer: napari.Viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def shortcuts_text() -> str:
    """The keyboard and mouse shortcuts, one per line (shown in the widget)."""
    lines = [f"{m}: {d}" for m, d in MOUSE_HELP] + [f"{k}: {d}" for k, _, d in KEYS]
    return "\n".join(lines)


def _guard(fn):
    """Editor actions: no-op without a session; library errors go to the status line."""

    def wrapper(self, *args, **kwargs):
        if self.session is None:
            self._status("no vesicles loaded")
            return None
        try:
            return fn(self, *args, **kwargs)
        except CryovesError as exc:
            self._status(f"error: {exc}")
            return None

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class VesicleEditorWidget(QWidget):
    """Review and correct vesicles: add, delete, move, resize, refit, review queue, undo/redo, save."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session: EditSession | None = None
        self.selected: int | None = None
        self.current: QueueItem | None = None
        self._queue_index = 0
        self.image_layer = self.labels_layer = self.points_layer = self.rejected_layer = None
        self._build_ui()
        self._update_counts()

    # ----------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        lay = QVBoxLayout(self)
        files = QHBoxLayout()
        self.save_button = QPushButton("Save")
        self.save_button.setToolTip("Save table, labels, IMOD and pyto files to <result>/reviewed")
        self.force_box = QCheckBox("overwrite")
        self.force_box.setToolTip("Allow saving over the automatic result or another review")
        files.addWidget(self.save_button)
        files.addWidget(self.force_box)
        lay.addLayout(files)
        grid = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        for i, (name, label) in enumerate(
            [
                ("undo", "Undo"),
                ("redo", "Redo"),
                ("previous_item", "◀ Prev"),
                ("next_item", "Next ▶"),
                ("accept_current", "Keep (K)"),
                ("reject_current", "Reject (R)"),
                ("delete_selected", "Delete (D)"),
                ("refit_selected", "Refit (T)"),
            ]
        ):
            b = QPushButton(label)
            b.clicked.connect(getattr(self, name))
            grid.addWidget(b, i // 4, i % 4)
            self.buttons[name] = b
        lay.addLayout(grid)
        self.counts_label = QLabel()
        self.counts_label.setWordWrap(True)
        self.status_label = QLabel("Open a result with 'cryoves review' or the segmentation widget.")
        self.status_label.setWordWrap(True)
        lay.addWidget(self.counts_label)
        lay.addWidget(self.status_label)
        box = QGroupBox("Shortcuts")
        bl = QVBoxLayout(box)
        self.shortcuts_label = QLabel(shortcuts_text())
        bl.addWidget(self.shortcuts_label)
        lay.addWidget(box)
        lay.addStretch(1)
        self.save_button.clicked.connect(lambda: self.save())

    def _status(self, text: str) -> None:
        self.status_label.setText(text)
        log.info(text)

    def _update_counts(self) -> None:
        if self.session is None:
            self.counts_label.setText("no vesicles loaded")
            return
        c = self.session.counts()
        self.counts_label.setText(
            f"vesicles: {c['vesicles']} (accepted {c['accepted']}, added {c['added']}, of which manual "
            f"{c['manual']}) · rejected candidates: {c['rejected']} · to review: {c['queue']}"
        )
        self.buttons["undo"].setEnabled(self.session.can_undo)
        self.buttons["redo"].setEnabled(self.session.can_redo)

    # ----------------------------------------------------------------- loading
    def open_result(self, outdir: str | Path, *, recover: bool | None = None, image_layer=None) -> EditSession:
        """Load a ``cryoves segment`` output folder (using its recovery file when present).

        ``image_layer``: an open layer showing the tomogram (used for display and fitting instead
        of re-reading the input file named in the manifest).
        """
        recovering = recover is not False and (Path(outdir) / RECOVERY_NAME).exists()
        session, tomo = load_result(outdir, recover=recover)
        image = None
        if image_layer is not None:
            session.tomogram = image_layer.data
        elif tomo is not None:
            image = (tomo.data, tuple(v / 10.0 for v in tomo.voxel_size), tomo.path)
        self.set_session(session, image=image)
        if recovering:
            self._status(f"recovered unsaved edits from {session.recovery_path}")
        return session

    def set_session(self, session: EditSession, image: tuple[Any, tuple, Any] | None = None) -> None:
        """Show ``session``; ``image`` = (data, scale_nm, path) of the tomogram, or None to reuse
        an image layer already showing ``session.tomogram``."""
        for layer in (self.labels_layer, self.points_layer, self.rejected_layer):
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.session = session
        self.selected = self.current = None
        self._queue_index = 0
        scale = (session.voxel_size / 10.0,) * 3
        if image is not None:
            data, img_scale, path = image
            self.image_layer = self.viewer.add_image(
                data,
                name=Path(path).stem if path else "tomogram",
                scale=img_scale,
                contrast_limits=robust_contrast_limits(data),
                metadata={"cryoves_tomogram": str(path) if path else None},
            )
        else:
            self.image_layer = next(
                (
                    lyr
                    for lyr in self.viewer.layers
                    if getattr(lyr, "data", None) is session.tomogram and session.tomogram is not None
                ),
                None,
            )
        self.labels_layer = self.viewer.add_labels(session.labels, name="vesicles", scale=scale, opacity=0.35)
        # painting would bypass the table, which is the truth; edits go through the session only
        self.labels_layer.editable = False
        if self.viewer.dims.ndim == 3:
            self.viewer.dims.axis_labels = ("z", "y", "x")
        self.points_layer = self.viewer.add_points(
            session.table.centres, **points_kwargs(session.table, "vesicles (spheres)", scale)
        )
        self.rejected_layer = self.viewer.add_points(
            np.zeros((0, 3)),
            name="rejected candidates",
            scale=scale,
            face_color="transparent",
            border_color="red",
            border_width=0.04,
        )
        self._refresh_rejected()
        for layer in (self.image_layer, self.labels_layer, self.points_layer, self.rejected_layer):
            if layer is not None:
                self._attach(layer)
        self.points_layer.mode = "pan_zoom"
        self.viewer.layers.selection.active = self.labels_layer
        session.listeners.append(self._on_changed)
        self._update_counts()
        self._status(f"{len(session.table)} vesicles loaded; Shift+click adds, Ctrl+click selects")

    def _attach(self, layer) -> None:
        if self._on_click not in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.append(self._on_click)
        if self._on_wheel not in layer.mouse_wheel_callbacks:
            layer.mouse_wheel_callbacks.append(self._on_wheel)
        for key, action, _ in KEYS:
            layer.bind_key(key, self._key_handler(action), overwrite=True)

    def _key_handler(self, action: str):
        def handler(_layer):
            if action in _MOVES:
                self.move_selected_by(_MOVES[action])
            else:
                getattr(self, action)()

        handler.__name__ = f"cryoves_{action}"
        handler.__doc__ = dict((a, d) for _, a, d in KEYS)[action]
        return handler

    # ----------------------------------------------------------------- refresh
    def _on_changed(self, what: str) -> None:
        s = self.session
        if s is None:
            return
        if s.last_box is not None and self._box_visible(s.last_box):
            self.labels_layer.refresh()
        pts = self.points_layer
        pts.data = s.table.centres
        if len(s.table):
            pts.size = 2 * s.table.radii
            pts.border_color = source_colours(s.table)
        pts.features = {"id": s.table.ids}
        self._refresh_rejected()
        if self.selected is not None and self.selected not in set(s.table.ids):
            self.selected = None
        self._highlight()
        self._update_counts()
        self._status(what)

    def _box_visible(self, box) -> bool:
        """Does the re-rendered box (voxels) reach into what the labels layer shows?"""
        if self.viewer.dims.ndisplay == 3:
            return True
        lo, hi = box
        z = self._current_z()
        return lo[0] <= z < hi[0]

    def _current_z(self) -> int:
        world_z = self.viewer.dims.point[-3]
        return int(round(world_z / (self.session.voxel_size / 10.0)))

    def _refresh_rejected(self) -> None:
        rej = self.session.rejected
        c = rej[["z", "y", "x"]].to_numpy(float) if len(rej) else np.zeros((0, 3))
        r = rej["radius"].to_numpy(float) if len(rej) else np.zeros(0)
        ok = np.isfinite(c).all(axis=1) & np.isfinite(r) & (r > 0)
        self.rejected_layer.data = c[ok]
        if ok.any():
            self.rejected_layer.size = 2 * r[ok]

    def _highlight(self) -> None:
        s = self.session
        if self.selected is None:
            self.points_layer.selected_data = set()
            return
        idx = np.flatnonzero(s.table.ids == self.selected)
        self.points_layer.selected_data = set(idx.tolist())

    # ----------------------------------------------------------------- coordinates
    def world_to_voxel(self, position) -> np.ndarray:
        """World position (nm, viewer axes) → tomogram voxel (z, y, x)."""
        pos = np.asarray(position, dtype=float)[-3:]
        return pos / (self.session.voxel_size / 10.0)

    def focus(self, centre) -> None:
        """Show the slice through ``centre`` (voxels) and centre the camera on it."""
        nm = np.asarray(centre, float) * self.session.voxel_size / 10.0
        self.viewer.dims.set_point(self.viewer.dims.ndim - 3, nm[0])
        camera(self.viewer).center = tuple(nm)

    # ----------------------------------------------------------------- mouse
    def _on_click(self, layer, event) -> None:
        if self.session is None or event.type != "mouse_press" or self.viewer.dims.ndisplay != 2:
            return
        mods = {str(getattr(m, "name", m)) for m in event.modifiers}
        point = self.world_to_voxel(event.position)
        if mods == {"Shift"}:
            self.add_at(point)
        elif mods == {"Control"}:
            self.select_at(point)
        elif mods == {"Control", "Shift"}:
            self.delete_at(point)
        elif mods == {"Control", "Alt"}:  # plain Alt+drag is napari's zoom box
            self.move_selected_to(point)

    def _on_wheel(self, layer, event) -> None:
        if self.session is None or self.selected is None:
            return
        mods = {str(getattr(m, "name", m)) for m in event.modifiers}
        if mods != {"Shift"}:  # napari uses Ctrl+wheel (slices) and Alt+wheel (layers)
            return
        delta = np.asarray(event.delta, float)
        step = delta[np.argmax(np.abs(delta))] if delta.size else 0.0
        if step:
            self._change_radius(RADIUS_STEP if step > 0 else -RADIUS_STEP)
            event.handled = True

    # ----------------------------------------------------------------- actions (also the Python API)
    @_guard
    def add_at(self, point) -> int:
        """Add a vesicle at ``point`` (voxels, z, y, x) and select it."""
        vid = self.session.add(point)
        self.selected = vid
        row = self.session.row(vid)
        self._highlight()
        self._status(f"added vesicle {vid} ({row['source']}), radius {row['radius_nm']:.1f} nm")
        return vid

    @_guard
    def select_at(self, point) -> int | None:
        """Select the vesicle under ``point`` (voxels)."""
        self.selected = self.session.vesicle_at(point)
        self._highlight()
        self._status("nothing here" if self.selected is None else f"selected vesicle {self.selected}")
        return self.selected

    @_guard
    def delete_at(self, point) -> int | None:
        """Delete the vesicle under ``point`` (voxels)."""
        vid = self.session.vesicle_at(point)
        if vid is None:
            self._status("no vesicle under the cursor")
            return None
        self.session.delete(vid)
        return vid

    @_guard
    def move_selected_to(self, point) -> None:
        if self.selected is not None:
            self.session.move(self.selected, point)

    @_guard
    def delete_selected(self) -> None:
        if self.selected is not None:
            self.session.delete(self.selected)

    @_guard
    def refit_selected(self) -> None:
        if self.selected is not None and not self.session.refit(self.selected):
            self._status(f"refit of vesicle {self.selected} failed; sphere unchanged")

    def _change_radius(self, step: float) -> None:
        if self.session is None or self.selected is None:
            return
        r = float(self.session.row(self.selected)["radius"])
        try:
            self.session.set_radius(self.selected, max(r + step, 1.0))
        except CryovesError as exc:
            self._status(f"error: {exc}")

    def grow_selected(self) -> None:
        self._change_radius(RADIUS_STEP)

    def shrink_selected(self) -> None:
        self._change_radius(-RADIUS_STEP)

    @_guard
    def move_selected_by(self, delta) -> None:
        """Shift the selected vesicle by ``delta`` (dz, dy, dx voxels)."""
        if self.selected is not None:
            self.session.nudge(self.selected, delta)

    @_guard
    def undo(self) -> None:
        if self.session.undo() is None:
            self._status("nothing to undo")

    @_guard
    def redo(self) -> None:
        if self.session.redo() is None:
            self._status("nothing to redo")

    # ----------------------------------------------------------------- review queue
    def _go(self, index: int) -> QueueItem | None:
        queue = self.session.review_queue()
        if not queue:
            self.current = None
            self._status("review queue empty: every vesicle is reviewed")
            return None
        self._queue_index = int(np.clip(index, 0, len(queue) - 1))
        self.current = queue[self._queue_index]
        self.selected = self.current.key if self.current.kind == "vesicle" else None
        self._highlight()
        self.focus(self.current.centre)
        what = "rejected candidate" if self.current.kind == "rejected" else f"vesicle {self.current.key}"
        self._status(f"{self._queue_index + 1}/{len(queue)}: {what}, QC score {self.current.score:.2f}")
        return self.current

    @_guard
    def next_item(self) -> QueueItem | None:
        """Go to the next item of the review queue (worst QC first)."""
        return self._go(self._queue_index + 1 if self.current is not None else 0)

    @_guard
    def previous_item(self) -> QueueItem | None:
        return self._go(self._queue_index - 1)

    @_guard
    def accept_current(self) -> None:
        """Accept the current vesicle (or restore the current rejected candidate), then move on."""
        if self.current is None:
            self._go(0)
            return
        self.session.accept(self.current)
        self._go(self._queue_index)

    @_guard
    def reject_current(self) -> None:
        """Reject the current vesicle (or confirm the rejection of a candidate), then move on."""
        if self.current is None:
            self._go(0)
            return
        self.session.reject(self.current)
        self._go(self._queue_index)

    # ----------------------------------------------------------------- save
    @_guard
    def save(self, outdir: str | Path | None = None) -> dict | None:
        """Save all formats to ``outdir`` (default ``<result>/reviewed``); see :meth:`EditSession.save`."""
        written = self.session.save(outdir, force=self.force_box.isChecked())
        self.session.discard_recovery()
        self._status(f"saved {len(self.session.table)} vesicles to {written['csv'].parent}")
        return written


class _Progress(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    changed = Signal(str, float)


class SegmentWidget(QWidget):
    """Run ``cryoves segment`` on an image layer in a worker thread; results open in the editor."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.result = None
        self.editor: VesicleEditorWidget | None = None
        self._stop = threading.Event()
        self._progress = _Progress()
        self._progress.changed.connect(self._on_progress)
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    def _build_ui(self) -> None:
        form = QFormLayout()
        self.layer_box = QComboBox()
        self.voxel_size = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=100.0, value=0.0)
        self.voxel_size.setSpecialValueText("from file")
        self.voxel_size.setSuffix(" Å")
        self.radius = QDoubleSpinBox(decimals=1, minimum=0.0, maximum=200.0, value=0.0)
        self.radius.setSpecialValueText("auto")
        self.radius.setSuffix(" nm")
        self.min_radius = QDoubleSpinBox(decimals=1, minimum=0.0, maximum=200.0, value=12.0)
        self.min_radius.setSuffix(" nm")
        self.max_radius = QDoubleSpinBox(decimals=1, minimum=1.0, maximum=5000.0, value=90.0)
        self.max_radius.setSuffix(" nm")
        self.tta = QSpinBox(minimum=1, maximum=16, value=1)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.model = QLineEdit(DEFAULT_MODEL)
        self.outdir = QLineEdit()
        self.outdir.setPlaceholderText("output folder (empty: keep in memory)")
        self.force = QCheckBox("overwrite an existing result")
        for label, w in [
            ("tomogram", self.layer_box),
            ("voxel size", self.voxel_size),
            ("vesicle radius", self.radius),
            ("min radius", self.min_radius),
            ("max radius", self.max_radius),
            ("test-time augmentation", self.tta),
            ("device", self.device),
            ("model", self.model),
            ("output", self.outdir),
            ("", self.force),
        ]:
            form.addRow(label, w)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        lay.addWidget(self.progress)
        lay.addWidget(self.status_label)
        lay.addStretch(1)
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)

    def _refresh_layers(self, event=None) -> None:
        current = self.layer_box.currentText()
        self.layer_box.clear()
        names = [lyr.name for lyr in self.viewer.layers if isinstance(lyr, napari.layers.Image) and lyr.ndim == 3]
        self.layer_box.addItems(names)
        if current in names:
            self.layer_box.setCurrentText(current)

    def _tomogram(self):
        from cryoves.io import Tomogram, validate_voxel_size

        name = self.layer_box.currentText()
        if not name:
            raise CryovesError("no 3D image layer to segment; open a tomogram first")
        layer = self.viewer.layers[name]
        if self.voxel_size.value() > 0:
            vs = validate_voxel_size(self.voxel_size.value(), source="widget")
        elif not layer.metadata.get("voxel_size_a") and np.allclose(layer.scale[-3:], 1.0):
            # napari's default scale means "unknown", not 10 Å
            raise VoxelSizeError(f"layer '{name}' has no voxel size; enter it in the voxel size field (Å)")
        else:
            vs = validate_voxel_size(
                layer.metadata.get("voxel_size_a") or tuple(float(s) * 10 for s in layer.scale[-3:]),
                source=f"layer '{name}' scale",
            )
        path = layer.metadata.get("cryoves_tomogram")
        return Tomogram(data=layer.data, voxel_size=vs, path=Path(path) if path else None), layer

    def config(self):
        """The :class:`cryoves.pipeline.SegmentConfig` from the form."""
        from cryoves.pipeline import SegmentConfig

        return SegmentConfig(
            model=self.model.text() or DEFAULT_MODEL,
            vesicle_radius_nm=self.radius.value() or None,
            radius_range_nm=(self.min_radius.value(), self.max_radius.value()),
            tta=self.tta.value(),
            device=self.device.currentText(),
        )

    def segment_function(self):
        """The function run in the worker (``cryoves.pipeline.segment``; replaceable for tests)."""
        from cryoves.pipeline import segment

        return segment

    def run(self):
        """Start segmentation in a worker thread; returns the worker (None when the form is invalid)."""
        if self.worker is not None:
            self._set_status("a segmentation is already running")
            return None
        try:
            tomo, layer = self._tomogram()
            config = self.config()
            segment = self.segment_function()
        except (CryovesError, ImportError) as exc:
            self._set_status(f"error: {exc}")
            return None
        outdir = self.outdir.text().strip() or None
        self._stop.clear()
        self.result = None
        self.progress.setValue(0)

        def work():
            # errors are returned, not raised, so they reach the status line instead of a dialog
            try:
                return "done", segment(
                    tomo,
                    outdir,
                    config,
                    force=self.force.isChecked(),
                    progress=self._progress.changed.emit,
                    should_stop=self._stop.is_set,
                )
            except CryovesError as exc:
                kind = "cancelled" if type(exc).__name__ == "Cancelled" else "error"
                return kind, exc
            except Exception as exc:  # broad on purpose: shown to the user, logged with traceback
                log.exception("segmentation failed")
                return "error", exc

        self.worker = create_worker(work, _start_thread=False)
        self.worker.returned.connect(lambda res: self._on_done(res, tomo, layer))
        self.worker.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._set_status("segmenting…")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Ask the running segmentation to stop at its next checkpoint."""
        if self.worker is not None:
            # not worker.quit(): that would drop the 'returned' signal which reports the cancel
            self._stop.set()
            self._set_status("cancelling…")

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress.setValue(int(round(1000 * min(max(fraction, 0.0), 1.0))))
        self._set_status(f"{stage} ({100 * fraction:.0f} %)")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_done(self, res, tomo, layer) -> None:
        kind, value = res
        if kind == "cancelled":
            self._set_status("cancelled")
            return
        if kind == "error":
            self._set_status(f"error: {value}")
            return
        self.result = value
        self.progress.setValue(1000)
        prob = getattr(value, "probability", None)
        scale = tuple(v / 10.0 for v in tomo.voxel_size)
        if prob is not None:
            self.viewer.add_image(
                prob,
                name="vesicle probability",
                scale=scale,
                colormap="magma",
                visible=False,
                contrast_limits=(0.0, 1.0),
            )
        editor = self.editor_widget()
        outdir = getattr(value, "outdir", None)
        if outdir is not None and is_result_folder(outdir):
            editor.open_result(outdir, recover=False, image_layer=layer)
        else:
            session = EditSession(
                value.vesicles, tomo.shape, tomogram=layer.data, rejected=getattr(value, "rejected", None)
            )
            editor.set_session(session)
        self._set_status(f"found {len(value.vesicles)} vesicles")

    def editor_widget(self) -> VesicleEditorWidget:
        """The editor that receives the result (created and docked on first use)."""
        if self.editor is None:
            self.editor = VesicleEditorWidget(self.viewer)
            window = getattr(self.viewer, "window", None)
            if window is not None and hasattr(window, "add_dock_widget"):
                window.add_dock_widget(self.editor, name="Vesicle editor", area="right")
        return self.editor


def open_review(
    outdir: str | Path, *, recover: bool | None = None, viewer: napari.Viewer | None = None, block: bool = True
) -> tuple[napari.Viewer, VesicleEditorWidget]:
    """Open a napari viewer with the vesicle editor on a ``cryoves segment`` output folder.

    ``block`` runs the Qt event loop until the window is closed (the ``cryoves review`` command).
    """
    viewer = viewer or napari.Viewer(title=f"cryoves review: {Path(outdir).name}")
    editor = VesicleEditorWidget(viewer)
    viewer.window.add_dock_widget(editor, name="Vesicle editor", area="right")
    editor.open_result(outdir, recover=recover)
    if block:
        napari.run()
    return viewer, editor
