"""napari plugin: reader, segmentation widget and vesicle editor.

Only ``_reader`` and ``_widgets`` import napari/Qt (lazily, when napari loads the plugin);
:mod:`cryoves.napari._session` holds the GUI-free editor logic and is importable without them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cryoves.errors import CryovesError, InputError
from cryoves.napari._session import EditSession, QueueItem, load_result, qc_scores


def review(outdir: str | Path, *, recover: bool | None = None, block: bool = True):
    """Open napari with the vesicle editor on a ``cryoves segment`` output folder.

    ``recover=None`` continues from a recovery file left by a crashed session when present;
    ``block`` runs the GUI until the window is closed. Returns ``(viewer, editor_widget)``.
    Raises :class:`CryovesError` when napari is not installed.
    """
    from cryoves.results import OUTPUT_FILES, is_result_folder

    outdir = Path(outdir)
    if not is_result_folder(outdir):
        raise InputError(f"{outdir} holds no {OUTPUT_FILES['vesicles']}; give a 'cryoves segment' output folder")
    try:
        from cryoves.napari._widgets import open_review
    except ImportError as exc:
        raise CryovesError(f"the review GUI needs napari ({exc}); pip install 'cryoves[napari]'") from exc
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    ):
        # Qt would abort the whole process without a display
        raise CryovesError("no display for the napari window; run on a desktop, with 'ssh -X', or under 'xvfb-run -a'")
    return open_review(outdir, recover=recover, block=block)


__all__ = ["EditSession", "QueueItem", "load_result", "qc_scores", "review"]
