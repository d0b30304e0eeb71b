"""Make the documentation screenshot of the vesicle editor on a simulated synapse.

    xvfb-run -a python -m cryoves.napari._screenshot docs/napari_review.png --model WEIGHTS.h5

Simulates a synapse, segments it, opens the result in the editor, removes one detected vesicle and
adds it back by a (programmatic) click so the editing state shows, and saves ``viewer.screenshot``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def make_screenshot(
    path: str | Path,
    *,
    model: str = "cryovesnet",
    shape: tuple[int, int, int] = (96, 192, 192),
    seed: int = 0,
    size: tuple[int, int] = (1700, 950),
) -> Path:
    """Write a PNG of napari with the editor docked, on a simulated synapse of ``shape`` (z, y, x)."""
    import napari
    import numpy as np

    from cryoves.io import write_mrc
    from cryoves.napari._widgets import open_review
    from cryoves.pipeline import SegmentConfig, segment
    from cryoves.simulate import SimulationConfig, simulate

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate(SimulationConfig.preset("synapse", shape=shape), seed)
        tomo_path = write_mrc(Path(tmp) / "synapse.mrc", sim.tomogram.data, sim.tomogram.voxel_size)
        segment(tomo_path, Path(tmp) / "result", SegmentConfig(model=model, device="cpu"))
        viewer = napari.Viewer(title="cryoves review: simulated synapse", show=True)
        viewer.window.resize(*size)
        _, editor = open_review(Path(tmp) / "result", viewer=viewer, block=False, recover=False)
        s = editor.session
        # show an edit: the vesicle nearest the volume centre is deleted and re-added by the fit
        centre = np.asarray(shape) / 2
        vid = int(s.table.ids[np.argmin(np.linalg.norm(s.table.centres - centre, axis=1))])
        c = s.row(vid)[["z", "y", "x"]].to_numpy(float)
        s.delete(vid)
        new = editor.add_at(c + [0.0, 1.0, -1.0])
        editor.selected = new
        editor.focus(c)
        from cryoves.napari._widgets import camera

        camera(viewer).center = tuple(np.asarray(shape[1:]) / 2 * s.voxel_size / 10)
        camera(viewer).zoom = 0.9 * min(size) / (max(shape[1:]) * s.voxel_size / 10)
        viewer.layers.selection.active = editor.labels_layer
        from napari._qt.dialogs.qt_notification import NapariQtNotification
        from qtpy.QtWidgets import QApplication

        for _ in range(20):  # let Qt lay out the docked editor before grabbing the window
            QApplication.processEvents()
        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()  # napari's own start-up notices would cover the canvas
        QApplication.processEvents()
        if not editor.isVisible():
            raise RuntimeError("the editor widget is not visible; the screenshot would not show it")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(out), canvas_only=False, flash=False)
        viewer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--model", default="cryovesnet")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_screenshot(args.output, model=args.model, seed=args.seed))


if __name__ == "__main__":
    main()
