"""The vesicle editor's state, without any GUI: edits, undo/redo, review queue, recovery, saving.

The vesicle table is the single source of truth; :attr:`EditSession.labels` is a rendering of it
that is updated in place, box by box, after every edit. Coordinates are voxels of the tomogram
grid, (z, y, x); radii are outer radii in voxels. This module imports neither napari nor Qt, so
it is usable (and tested) headless and from scripts.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves.atomic import write_json_atomic
from cryoves.errors import CryovesError, FormatError, InputError, OutputExistsError, ParameterError
from cryoves.results import (
    MANIFEST_NAME,
    OUTPUT_FILES,
    REVIEW_KIND,
    Result,
    manifest_kind,
    open_result,
    read_manifest,
    review_manifest,
    write_result,
)
from cryoves.vesicles import REJECTED_COLUMNS, RejectedTable, VesicleTable, qc_score, render_labels

log = logging.getLogger(__name__)

#: Name of the recovery file written next to the result after every edit.
RECOVERY_NAME = ".cryoves-review-recovery.json"
#: Default folder (inside the automatic result) where reviewed results are saved.
REVIEW_DIRNAME = "reviewed"
#: Radius (nm) of a manually placed vesicle when neither the table nor the caller gives one.
DEFAULT_RADIUS_NM = 20.0
MAX_HISTORY = 1000

#: ``fitter(volume, centre_guess, radius_guess, voxel_size_a) -> fit or None``; a fit has
#: ``centre`` (z, y, x voxels) and ``radius`` (voxels) attributes (extra float attributes
#: named like QC columns are copied into the table).
Fitter = Callable[[Any, np.ndarray, float, float], Any]


@dataclass(frozen=True)
class QueueItem:
    """One entry of the review queue: a vesicle (``kind="vesicle"``, ``key`` = id) or a
    pipeline-rejected candidate (``kind="rejected"``, ``key`` = row index in :attr:`EditSession.rejected`)."""

    kind: str
    key: int
    centre: tuple[float, float, float]
    radius: float
    score: float


def default_fitter() -> Fitter | None:
    """The radial-profile sphere fit of the pipeline, or None when it is not available."""
    try:
        from cryoves.postprocess.spheres import fit_sphere
    except ImportError:  # pragma: no cover - depends on the installed version
        log.warning("cryoves.postprocess.spheres.fit_sphere is not available; clicks place manual spheres")
        return None
    return fit_sphere


def qc_scores(df: pd.DataFrame) -> np.ndarray:
    """Outlier score per row: :func:`cryoves.vesicles.qc_score` (flagged vesicles first)."""
    return qc_score(df)


def _empty_rejected() -> pd.DataFrame:
    cols = {c: pd.Series(dtype=float) for c in ("z", "y", "x", "radius")}
    cols.update(id=pd.Series(dtype=np.int64), step=pd.Series(dtype=object), reason=pd.Series(dtype=object))
    return pd.DataFrame(cols)[REJECTED_COLUMNS].assign(review=pd.Series(dtype=object))


class EditSession:
    """Interactive edits of a vesicle table with undo/redo, a review queue and crash recovery.

    Args:
        table: the vesicles (voxel size in Å; coordinates in voxels of the tomogram grid).
        shape: (z, y, x) shape of the tomogram.
        tomogram: the volume used by the sphere fit (any array-like; None: no fitting).
        rejected: candidates rejected by the pipeline (a :class:`~cryoves.vesicles.RejectedTable` or a
            frame with its columns ``id, z, y, x, radius, step, reason``). Their ids should differ
            from the vesicles' (a ``segment`` result's do); when they do not (results of older
            versions), the candidates are renumbered after the vesicles.
        recovery_path: file rewritten (atomically) after every edit; None disables autosave.
        fitter: sphere fit (default: ``cryoves.postprocess.spheres.fit_sphere``); None: no fitting.
        expected_radius: radius (voxels) of manually placed spheres; default the median table radius.
        source_dir: the automatic result this session edits (never overwritten without ``force``).
    """

    def __init__(
        self,
        table: VesicleTable,
        shape: Sequence[int],
        *,
        tomogram: Any = None,
        rejected: pd.DataFrame | RejectedTable | None = None,
        recovery_path: str | Path | None = None,
        fitter: Fitter | None | str = "default",
        expected_radius: float | None = None,
        source_dir: str | Path | None = None,
        session_id: str | None = None,
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        inputs: dict | None = None,
    ):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise InputError(f"the tomogram shape must be (z, y, x), got {self.shape}")
        self.voxel_size = table.voxel_size
        self.origin = tuple(float(o) for o in origin)
        #: the ``inputs`` of the automatic result's manifest (tomogram path, voxel size), kept on save
        self.inputs = dict(inputs or {})
        self.tomogram = tomogram
        self.fitter = default_fitter() if fitter == "default" else fitter
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.recovery_path = Path(recovery_path) if recovery_path is not None else None
        self.session_id = session_id or uuid.uuid4().hex
        self._expected_radius = expected_radius
        df = table.df.copy()
        if "source" not in df.columns:
            df["source"] = "auto"
        if "review" not in df.columns:
            df["review"] = ""
        df["review"] = _text_column(df["review"])
        self.table = table.with_df(df).with_grid(self.shape, self.origin)
        #: the rejected candidates (a :class:`RejectedTable`'s columns plus ``review``); ids never
        #: collide with the vesicles', so a restored candidate keeps its id
        self.rejected = self._normalise_rejected(rejected, self.table.ids)
        self.labels = self.table.to_labels(self.shape)
        #: (lo, hi) voxel corners of the box re-rendered by the last edit (for partial display refresh)
        self.last_box: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._undo: list[tuple[str, tuple, tuple]] = []
        self._redo: list[tuple[str, tuple, tuple]] = []
        self.listeners: list[Callable[[str], None]] = []

    # ----------------------------------------------------------------- state
    @staticmethod
    def _normalise_rejected(rejected: pd.DataFrame | RejectedTable | None, vesicle_ids: np.ndarray) -> pd.DataFrame:
        if rejected is None or len(rejected) == 0:
            return _empty_rejected()
        df = rejected.df if isinstance(rejected, RejectedTable) else rejected.copy()
        ids = pd.to_numeric(df["id"], errors="coerce") if "id" in df.columns else None
        if ids is None or ids.isna().any() or ids.duplicated().any() or ids.isin(vesicle_ids).any():
            # ids of an older result (intermediate objects): give them ids after the vesicles'
            first = int(vesicle_ids.max()) + 1 if len(vesicle_ids) else 1
            df = df.assign(id=np.arange(first, first + len(df)))
        df = RejectedTable(df).df
        if "review" not in df.columns:
            df["review"] = ""
        df["review"] = _text_column(df["review"])
        return df.reset_index(drop=True)

    def next_id(self) -> int:
        """The id of the next added vesicle: above every vesicle's and rejected candidate's."""
        ids = np.concatenate([self.table.ids, pd.to_numeric(self.rejected["id"], errors="coerce").dropna().to_numpy()])
        return int(ids.max()) + 1 if len(ids) else 1

    def _state(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.table.df, self.rejected

    @property
    def expected_radius(self) -> float:
        """Radius (voxels) of a manually placed sphere."""
        if self._expected_radius is not None:
            return float(self._expected_radius)
        if len(self.table):
            return float(np.median(self.table.radii))
        return DEFAULT_RADIUS_NM * 10.0 / self.voxel_size

    def counts(self) -> dict[str, int]:
        """Live counts for the widget: vesicles, accepted, manual/added, rejected candidates, queue left."""
        df = self.table.df
        src = _text_column(df["source"])
        return {
            "vesicles": len(df),
            "accepted": int((df["review"] == "accepted").sum()),
            "added": int(src.isin(["manual", "fitted", "restored"]).sum()),
            "manual": int((src == "manual").sum()),
            "rejected": len(self.rejected),
            "queue": len(self.review_queue()),
        }

    def vesicle_at(self, point: Sequence[float]) -> int | None:
        """Id of the vesicle covering voxel ``point`` (z, y, x; rounded), or None."""
        idx = tuple(int(round(float(p))) for p in point)
        if any(i < 0 or i >= s for i, s in zip(idx, self.shape, strict=True)):
            return None
        val = int(self.labels[idx])
        return val or None

    def row(self, vid: int) -> pd.Series:
        rows = self.table.df[self.table.df["id"] == vid]
        if len(rows) == 0:
            raise ParameterError(f"no vesicle with id {vid}; pick an existing vesicle")
        return rows.iloc[0]

    # ----------------------------------------------------------------- edits
    def _commit(self, name: str, df: pd.DataFrame, rejected: pd.DataFrame | None = None) -> None:
        before = self._state()
        after = (df, self.rejected if rejected is None else rejected)
        self._apply(after, before)
        self._undo.append((name, before, after))
        del self._undo[:-MAX_HISTORY]
        self._redo.clear()
        self._changed(name)

    def _apply(self, state: tuple[pd.DataFrame, pd.DataFrame], previous: tuple[pd.DataFrame, pd.DataFrame]) -> None:
        new_table = self.table.with_df(state[0])
        self._rerender(previous[0], new_table.df)
        self.table = new_table
        self.rejected = state[1].reset_index(drop=True)

    def _changed(self, what: str) -> None:
        self.autosave()
        for fn in list(self.listeners):
            fn(what)

    def _rerender(self, old: pd.DataFrame, new: pd.DataFrame) -> None:
        """Re-render only the boxes of spheres that differ between ``old`` and ``new``."""
        self.last_box = None
        key = ["z", "y", "x", "radius"]
        o = old.set_index("id")[key]
        n = new.set_index("id")[key]
        common = o.index.intersection(n.index)
        moved = common[(o.loc[common].to_numpy() != n.loc[common].to_numpy()).any(axis=1)]
        gone = o.index.difference(n.index)
        added = n.index.difference(o.index)
        spheres = [o.loc[i].to_numpy() for i in moved.union(gone)] + [n.loc[i].to_numpy() for i in moved.union(added)]
        if not spheres:
            return
        s = np.asarray(spheres, dtype=float)
        lo = np.clip(np.ceil(s[:, :3] - s[:, 3:]).astype(int).min(axis=0), 0, self.shape)
        hi = np.clip(np.floor(s[:, :3] + s[:, 3:]).astype(int).max(axis=0) + 1, 0, self.shape)
        if np.any(hi <= lo):
            return
        # every vesicle whose ball reaches into the box is repainted there, in table order, so
        # the box ends up exactly as a full render of the new table would paint it
        c, r = n.to_numpy()[:, :3], n.to_numpy()[:, 3]
        touches = np.all((c + r[:, None] >= lo) & (c - r[:, None] <= hi - 1), axis=1)
        box = self.labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        box[...] = 0
        render_labels(c[touches] - lo, r[touches], n.index.to_numpy()[touches], box.shape, out=box)
        self.last_box = (tuple(lo), tuple(hi))

    def add(self, centre: Sequence[float], radius: float | None = None, *, fit: bool = True) -> int:
        """Add a vesicle near ``centre`` (z, y, x voxels) and return its id.

        With ``fit`` and a tomogram, the radial-profile fit refines centre and radius
        (``source="fitted"``); when it fails or is unavailable a sphere of ``radius`` (default
        :attr:`expected_radius`) is placed at ``centre`` and flagged ``source="manual"``.
        """
        centre = np.asarray(centre, dtype=float).reshape(3)
        if np.any(centre < -0.5) or np.any(centre > np.asarray(self.shape) - 0.5):
            raise ParameterError(f"centre {tuple(centre)} lies outside the tomogram {self.shape}")
        radius = self.expected_radius if radius is None else float(radius)
        if radius <= 0:
            raise ParameterError(f"radius must be positive, got {radius}")
        row = {"z": centre[0], "y": centre[1], "x": centre[2], "radius": radius, "source": "manual"}
        if fit:
            row.update(self._fit(centre, radius) or {})
        vid = self.next_id()
        row.update(id=vid, review="accepted")
        df = pd.concat([self.table.df, pd.DataFrame([row])], ignore_index=True)
        self._commit(f"add {vid}", df)
        return vid

    def _fit(self, centre: np.ndarray, radius: float) -> dict | None:
        if self.fitter is None or self.tomogram is None:
            return None
        try:
            fit = self.fitter(self.tomogram, centre, radius, self.voxel_size)
        except Exception as exc:  # noqa: BLE001 - a failed fit must never lose the click
            log.warning("sphere fit at %s failed: %s", tuple(np.round(centre, 1)), exc)
            return None
        row = _fit_to_row(fit, self.shape)
        if row is None or not _plausible(row, centre, radius):
            log.info("no plausible sphere fit at %s; placing a manual sphere", tuple(np.round(centre, 1)))
            return None
        thickness = getattr(fit, "membrane_thickness", None)
        if isinstance(thickness, (int, float)) and np.isfinite(thickness):
            row["membrane_thickness_nm"] = float(thickness) * self.voxel_size / 10.0
        return row

    def delete(self, vid: int) -> None:
        """Delete vesicle ``vid`` (it is not kept as a rejected candidate)."""
        self.row(vid)
        self._commit(f"delete {vid}", self.table.df[self.table.df["id"] != vid])

    def move(self, vid: int, centre: Sequence[float]) -> None:
        """Move vesicle ``vid`` to ``centre`` (z, y, x voxels)."""
        self._edit(vid, f"move {vid}", **dict(zip("zyx", (float(c) for c in centre), strict=True)))

    def nudge(self, vid: int, delta: Sequence[float]) -> None:
        """Shift vesicle ``vid`` by ``delta`` (dz, dy, dx voxels)."""
        r = self.row(vid)
        self.move(vid, (r["z"] + delta[0], r["y"] + delta[1], r["x"] + delta[2]))

    def set_radius(self, vid: int, radius: float) -> None:
        """Set the outer radius of vesicle ``vid`` (voxels, > 0)."""
        if not np.isfinite(radius) or radius <= 0.5:
            raise ParameterError(f"radius must be above 0.5 voxel, got {radius}")
        self._edit(vid, f"radius {vid}", radius=float(radius))

    def refit(self, vid: int) -> bool:
        """Refit vesicle ``vid`` from its current centre and radius; False (no change) if the fit fails."""
        r = self.row(vid)
        res = self._fit(r[["z", "y", "x"]].to_numpy(float), float(r["radius"]))
        if res is None:
            return False
        self._edit(vid, f"refit {vid}", **res)
        return True

    def _edit(self, vid: int, name: str, **values: Any) -> None:
        self.row(vid)
        df = self.table.df.copy()
        mask = df["id"] == vid
        for k, v in values.items():
            if k not in df.columns:
                df[k] = np.nan if not isinstance(v, str) else ""
            df.loc[mask, k] = v
        if df.loc[mask, "source"].iloc[0] == "auto":
            df.loc[mask, "source"] = "edited"
        self._commit(name, df)

    # ----------------------------------------------------------------- review
    def review_queue(self, include_reviewed: bool = False) -> list[QueueItem]:
        """Items to review, worst first: pipeline-rejected candidates, then vesicles by QC score."""
        items: list[QueueItem] = []
        rej = self.rejected
        if len(rej):
            sph = rej[["z", "y", "x", "radius"]].to_numpy(float)
            todo = np.isfinite(sph).all(axis=1) & (include_reviewed | (rej["review"].to_numpy(str) == ""))
            items += [QueueItem("rejected", int(i), tuple(sph[i, :3]), float(sph[i, 3]), np.inf) for i in np.flatnonzero(todo)]
        df = self.table.df
        if len(df):
            score = qc_scores(df)
            sph = df[["z", "y", "x", "radius"]].to_numpy(float)
            ids = df["id"].to_numpy()
            todo = include_reviewed | (df["review"].to_numpy(str) == "")
            order = [k for k in np.argsort(-score, kind="stable") if todo[k]]
            items += [QueueItem("vesicle", int(ids[k]), tuple(sph[k, :3]), float(sph[k, 3]), float(score[k])) for k in order]
        return items

    def accept(self, item: QueueItem | int) -> int | None:
        """Accept a vesicle (mark reviewed) or restore a rejected candidate; returns the vesicle id."""
        item = self._item(item)
        if item.kind == "rejected":
            return self.restore(item.key)
        df = self.table.df.copy()
        df.loc[df["id"] == item.key, "review"] = "accepted"
        self._commit(f"accept {item.key}", df)
        return item.key

    def reject(self, item: QueueItem | int) -> None:
        """Reject a vesicle (moved to the rejected table, restorable) or confirm a rejected candidate."""
        item = self._item(item)
        rej = self.rejected.copy()
        if item.kind == "rejected":
            rej.loc[item.key, "review"] = "rejected"
            self._commit(f"confirm rejection {item.key}", self.table.df, rej)
            return
        row = self.row(item.key)
        new = {c: row[c] for c in ("id", "z", "y", "x", "radius")}
        new.update(step="review", reason="rejected in review", review="rejected")
        rej = pd.concat([rej, pd.DataFrame([new])], ignore_index=True)
        self._commit(f"reject {item.key}", self.table.df[self.table.df["id"] != item.key], rej)

    def restore(self, index: int) -> int:
        """Move rejected candidate ``index`` (row of :attr:`rejected`) back into the table; returns its id."""
        if not 0 <= index < len(self.rejected):
            raise ParameterError(f"no rejected candidate number {index}")
        row = self.rejected.iloc[index]
        if not np.isfinite(row[["z", "y", "x", "radius"]].to_numpy(float)).all() or row["radius"] <= 0:
            raise ParameterError(f"rejected candidate {index} has no sphere to restore")
        vid = (
            int(row["id"])
            if pd.notna(row["id"]) and int(row["id"]) not in set(self.table.ids) and int(row["id"]) > 0
            else self.next_id()
        )
        new = {
            "id": vid,
            "z": row["z"],
            "y": row["y"],
            "x": row["x"],
            "radius": row["radius"],
            "source": "restored",
            "review": "accepted",
        }
        df = pd.concat([self.table.df, pd.DataFrame([new])], ignore_index=True)
        self._commit(f"restore {vid}", df, self.rejected.drop(index=index))
        return vid

    def _item(self, item: QueueItem | int) -> QueueItem:
        if isinstance(item, QueueItem):
            return item
        r = self.row(int(item))
        return QueueItem("vesicle", int(item), (r["z"], r["y"], r["x"]), float(r["radius"]), 0.0)

    # ----------------------------------------------------------------- undo / redo
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> str | None:
        """Undo the last edit; returns its name (None when there is nothing to undo)."""
        if not self._undo:
            return None
        name, before, after = self._undo.pop()
        self._apply(before, self._state())
        self._redo.append((name, before, after))
        self._changed(f"undo {name}")
        return name

    def redo(self) -> str | None:
        """Redo the last undone edit; returns its name (None when there is nothing to redo)."""
        if not self._redo:
            return None
        name, before, after = self._redo.pop()
        self._apply(after, self._state())
        self._undo.append((name, before, after))
        self._changed(f"redo {name}")
        return name

    # ----------------------------------------------------------------- recovery
    def to_json(self) -> dict:
        """The session state (table, rejected candidates, geometry) as JSON-able data."""
        return {
            "format": "cryoves-review-recovery",
            "version": 1,
            "session_id": self.session_id,
            "voxel_size_a": self.voxel_size,
            "shape": list(self.shape),
            "origin_a": list(self.origin),
            "source_dir": str(self.source_dir) if self.source_dir else None,
            "inputs": self.inputs,
            "expected_radius": self._expected_radius,
            "vesicles": json.loads(self.table.df.to_json(orient="split", index=False)),
            "rejected": json.loads(self.rejected.to_json(orient="split", index=False)),
        }

    def autosave(self) -> Path | None:
        """Rewrite the recovery file (atomically), if one is configured."""
        if self.recovery_path is None:
            return None
        return write_json_atomic(self.recovery_path, self.to_json())

    @classmethod
    def recover(cls, path: str | Path, *, tomogram: Any = None, fitter: Fitter | None | str = "default") -> EditSession:
        """Rebuild a session from a recovery file written by :meth:`autosave`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "cryoves-review-recovery":
                raise ValueError("not a cryoves recovery file")
            df = pd.DataFrame(**data["vesicles"])
            rej = pd.DataFrame(**data["rejected"])
        except FileNotFoundError as exc:
            raise InputError(f"recovery file not found: {path}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{path} is not a readable recovery file ({exc}); delete it to start afresh") from exc
        table = VesicleTable(df, data["voxel_size_a"])
        return cls(
            table,
            data["shape"],
            tomogram=tomogram,
            rejected=rej,
            recovery_path=path,
            fitter=fitter,
            expected_radius=data.get("expected_radius"),
            session_id=data["session_id"],
            source_dir=data.get("source_dir"),
            origin=data.get("origin_a") or (0, 0, 0),
            inputs=data.get("inputs"),
        )

    def discard_recovery(self) -> None:
        if self.recovery_path is not None:
            self.recovery_path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- save
    def save(self, outdir: str | Path | None = None, *, force: bool = False) -> dict[str, Path]:
        """Write the edited result to ``outdir`` in all formats.

        The default ``outdir`` is ``<source_dir>/reviewed``, or ``source_dir`` itself when that
        already is a saved review (re-opened reviews save in place).

        Writes vesicles.csv, rejected.csv, labels.mrc and, where the exporters are installed,
        vesicles.star, vesicles.mod (IMOD) and pyto_labels.mrc; manifest.json last. Refuses
        (:class:`OutputExistsError`) to overwrite the automatic result or another session's
        saved review unless ``force``. Returns ``{format: path}``.
        """
        if outdir is None:
            if self.source_dir is None:
                raise ParameterError("no output folder given and the session has no source folder; pass -o/--output")
            outdir = (
                self.source_dir if _manifest_kind(self.source_dir) == "review" else self.source_dir / REVIEW_DIRNAME
            )
        outdir = Path(outdir)
        self._check_overwrite(outdir, force)
        outdir.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}

        def write_files(out: Path) -> list[str]:
            from cryoves.io import write_mrc

            table = self.table
            written["csv"] = table.write_csv(out / OUTPUT_FILES["vesicles"])
            written["rejected"] = RejectedTable(self.rejected).write_csv(out / OUTPUT_FILES["rejected"])
            vs = (self.voxel_size,) * 3
            written["labels"] = write_mrc(out / OUTPUT_FILES["labels"], self.labels, vs, self.origin)
            for name, fn in _optional_exporters().items():
                try:
                    written[name] = fn(out, table, self.labels, self.shape, vs, self.origin)
                except ImportError as exc:
                    log.warning("%s export skipped: %s", name, exc)
            return [p.name for p in written.values()]

        manifest = review_manifest(
            session_id=self.session_id,
            source_dir=self.source_dir,
            inputs=self.inputs,
            counts=self.counts(),
            voxel_size_a=self.voxel_size,
            shape=self.shape,
            origin_a=self.origin,
        )
        written["manifest"] = write_result(outdir, write_files, manifest)
        return written

    def _check_overwrite(self, outdir: Path, force: bool) -> None:
        manifest = outdir / MANIFEST_NAME
        if force or not manifest.exists():
            return
        meta = _read_manifest(outdir)
        if meta.get("kind") == "review" and meta.get("review", {}).get("session_id") == self.session_id:
            return  # our own earlier save
        what = "a review saved by another session" if meta.get("kind") == "review" else "the automatic result"
        raise OutputExistsError(f"{outdir} holds {what}; save elsewhere or pass force=True (--force) to overwrite it")


def _text_column(col: pd.Series) -> pd.Series:
    """A text column with "" for missing values (CSV gives float NaN for an all-empty column)."""
    return col.astype(object).where(col.notna(), "").astype(str)


def _read_manifest(folder: Path) -> dict:
    try:
        return read_manifest(folder) or {}
    except CryovesError:
        return {}


def _manifest_kind(folder: Path) -> str | None:
    return manifest_kind(_read_manifest(folder) or None)


def _plausible(row: dict, centre: np.ndarray, radius: float) -> bool:
    """A refined sphere must stay near the click and keep a radius within 0.5-2x the guess."""
    shift = np.linalg.norm(np.array([row["z"], row["y"], row["x"]]) - centre)
    return bool(0.5 * radius <= row["radius"] <= 2.0 * radius and shift <= max(radius, 2.0))


def _fit_to_row(fit: Any, shape: Sequence[int]) -> dict | None:
    """Turn a sphere-fit result into table values; None for a failed or implausible fit."""
    if fit is None:
        return None
    get = fit.get if isinstance(fit, dict) else (lambda k, d=None: getattr(fit, k, d))
    if get("converged", True) is False:
        return None
    centre = get("centre", None)
    if centre is None:
        centre = (get("z"), get("y"), get("x"))
    radius = get("radius")
    try:
        centre = np.asarray(centre, dtype=float).reshape(3)
        radius = float(radius)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(centre).all() and np.isfinite(radius) and radius > 0):
        return None
    if np.any(centre < -0.5) or np.any(centre > np.asarray(shape) - 0.5):
        return None
    row = {"z": centre[0], "y": centre[1], "x": centre[2], "radius": radius, "source": "fitted"}
    for k in ("membrane_thickness_nm", "membrane_density", "lumen_density", "profile_correlation", "fit_residual"):
        v = get(k)
        if isinstance(v, (int, float, np.floating)) and np.isfinite(v):
            row[k] = float(v)
    return row


def _optional_exporters() -> dict[str, Callable[..., Path]]:
    """Exporters owned by other modules; each raises ImportError when its module is missing."""

    def star(outdir, table, labels, shape, vs, origin):
        from cryoves.io.tables import write_star

        return Path(write_star(outdir / OUTPUT_FILES["star"], table))

    def imod(outdir, table, labels, shape, vs, origin):
        from cryoves.io.imod import write_vesicles_mod

        return Path(write_vesicles_mod(outdir / OUTPUT_FILES["mod"], table, shape))

    def pyto(outdir, table, labels, shape, vs, origin):
        from cryoves.io.pyto import write_pyto_labels

        labels_path, _ids = write_pyto_labels(outdir / OUTPUT_FILES["pyto"], table, shape, origin=origin)
        return Path(labels_path)

    return {"star": star, "imod": imod, "pyto": pyto}


def load_result(
    outdir: str | Path, *, recover: bool | None = None, fitter: Fitter | None | str = "default"
) -> tuple[EditSession, Any]:
    """Open a ``cryoves segment`` output folder for review; returns ``(session, tomogram)``.

    The tomogram (a :class:`cryoves.io.Tomogram`, or None when its file is gone) comes from
    the manifest. With ``recover=None`` a recovery file left by a crashed session is used when
    present; ``recover=False`` ignores (and later overwrites) it.
    """
    result = open_result(outdir)
    tomo = _open_input_tomogram(result)
    recovery = result.path / RECOVERY_NAME
    if recovery.exists() and recover is not False:
        session = EditSession.recover(recovery, tomogram=None if tomo is None else tomo.data, fitter=fitter)
        log.info("recovered %d vesicles from %s", len(session.table), recovery)
        return session, tomo
    shape = tomo.shape if tomo is not None else result.shape
    if shape is None:
        raise InputError(
            f"cannot tell the tomogram shape: neither the input tomogram nor {result.file('labels')} exists"
        )
    manifest = result.manifest
    session = EditSession(
        result.vesicles,
        shape,
        tomogram=None if tomo is None else tomo.data,
        rejected=result.rejected if result.file("rejected").exists() else None,
        recovery_path=recovery,
        fitter=fitter,
        source_dir=result.path,
        origin=tomo.origin if tomo is not None else result.origin_a,
        inputs=result.inputs,
        # a saved review re-opened keeps its session id, so saving it again needs no force
        session_id=manifest.get("review", {}).get("session_id") if result.kind == REVIEW_KIND else None,
    )
    return session, tomo


def _open_input_tomogram(result: Result) -> Any:
    from cryoves.io import read_tomogram

    path = result.tomogram_path
    if path is None:
        return None
    if not path.exists():
        log.warning("input tomogram %s not found; reviewing without it (no sphere fitting)", path)
        return None
    return read_tomogram(path, voxel_size=result.inputs.get("voxel_size_a"))  # the size the result was made with
