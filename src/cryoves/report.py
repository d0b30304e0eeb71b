"""The QC report: one self-contained HTML file (PNGs embedded as data URIs) plus the PNGs.

Built from a segmentation folder (``vesicles.csv``, ``rejected.csv``, ``manifest.json``) and the
tomogram named in its manifest. Sections: orthogonal slices with vesicle outlines, a gallery of the
worst-scored vesicles (central slices + radial profiles), radius histogram (nm), outlier scatter
(radius × thickness × membrane density coloured by p-value), rejected candidates with reasons,
per-step timings and parameters, the synapse analysis when an active zone is known, and, when
ground truth is given, the evaluation table with misses and false positives marked on the slices.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoves import parallel
from cryoves.atomic import atomic_path, write_text_atomic
from cryoves.errors import CryovesError, InputError
from cryoves.results import MANIFEST_NAME, Result, open_result, read_manifest
from cryoves.vesicles import VesicleTable, qc_score

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
REPORT_DIR = "report"
GALLERY_SIZE = 12


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    """Write ``fig`` as PNG; ``tight=False`` for figures laid out by hand (a tight box costs a draw)."""
    with atomic_path(path) as tmp:
        # zlib level 3: 2x faster than the default 6 on these figures, files no larger (measured)
        fig.savefig(tmp, dpi=110, bbox_inches="tight" if tight else None, format="png",
                    pil_kwargs={"compress_level": 3})
    _plt().close(fig)
    return path


def _contrast(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _circles(ax: Any, table: pd.DataFrame, axis: int, index: float, color: str, lw: float = 1.0) -> None:
    """Outline every sphere cut by the plane ``coord[axis] == index`` (display axes are the other two)."""
    names = ["z", "y", "x"]
    rows, cols = [n for k, n in enumerate(names) if k != axis]
    d = table[names[axis]].to_numpy() - index
    r = table["radius"].to_numpy()
    cut = np.abs(d) < r
    rr = np.sqrt(np.maximum(r[cut] ** 2 - d[cut] ** 2, 0))
    _outline(ax, table[cols].to_numpy()[cut], table[rows].to_numpy()[cut], rr, color, lw)


def _outline(ax: Any, x: np.ndarray, y: np.ndarray, radius: np.ndarray, color: str, lw: float,
             clip: tuple[float, float, float, float] | None = None) -> None:
    """Circles of ``radius`` around (x, y) in data coordinates, drawn as one collection (one patch
    per circle made the slice figure 3x slower: each patch updates the axes' limits); ``clip``:
    (x, y, width, height) of the data rectangle they are cut to (default: the axes)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle, Rectangle

    if len(radius):
        circles = [Circle((float(a), float(b)), float(c)) for a, b, c in zip(x, y, radius, strict=True)]
        coll = ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor=color, linewidths=lw),
                                 autolim=False)
        if clip is not None:
            coll.set_clip_path(Rectangle(clip[:2], clip[2], clip[3], transform=ax.transData))


def plot_slices(
    volume: np.ndarray,
    vesicles: pd.DataFrame,
    path: Path,
    misses: pd.DataFrame | None = None,
    false_positives: pd.DataFrame | None = None,
    aspect_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Path:
    """Central XY, XZ and YZ slices with vesicle outlines (misses red, false positives orange)."""
    plt = _plt()
    zc, yc, xc = (s // 2 for s in volume.shape)
    planes = [
        ("XY (z = %d)" % zc, _plane(volume, 0, zc), 0, zc),
        ("XZ (y = %d)" % yc, _plane(volume, 1, yc), 1, yc),
        ("YZ (x = %d)" % xc, _plane(volume, 2, xc), 2, xc),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for ax, (title, img, axis, idx) in zip(axes, planes):
        lo, hi = _contrast(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        _circles(ax, vesicles, axis, idx, "#00e5ff")
        if misses is not None and len(misses):
            _circles(ax, misses, axis, idx, "red", 1.8)
        if false_positives is not None and len(false_positives):
            _circles(ax, false_positives, axis, idx, "orange", 1.8)
        ax.set_title(title, y=1.0)
        ax.set_axis_off()
    fig.suptitle("vesicles (cyan)" + (", misses (red), false positives (orange)" if misses is not None else ""))
    return _save(fig, path)


def _plane(volume: Any, axis: int, index: int, slab: int = 16) -> np.ndarray:
    """One plane of ``volume`` (z, y, x), read slab by slab along z: a YZ plane of a memory-mapped
    tomogram touches every page of the file, which would otherwise all stay in memory."""
    from cryoves.io.tomogram import release_pages

    if axis == 0:
        return np.asarray(volume[index])
    parts = []
    for z in range(0, volume.shape[0], slab):
        index_zyx: list[Any] = [slice(z, z + slab), slice(None), slice(None)]
        index_zyx[axis] = index
        parts.append(np.array(volume[tuple(index_zyx)]))
        release_pages(volume)
    return np.concatenate(parts)


def radial_profile(volume: np.ndarray, centre: np.ndarray, r_max: float, step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity in spherical shells of width ``step`` voxels around a sub-voxel ``centre``."""
    lo = np.maximum(np.floor(centre - r_max).astype(int), 0)
    hi = np.minimum(np.ceil(centre + r_max).astype(int) + 1, volume.shape)
    box = np.asarray(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float64)
    grids = np.meshgrid(*(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)), indexing="ij")
    dist = np.sqrt(sum(g**2 for g in grids))
    bins = np.floor(dist / step).astype(int).ravel()
    n = int(r_max / step) + 1
    keep = bins < n
    sums = np.bincount(bins[keep], weights=box.ravel()[keep], minlength=n)
    counts = np.bincount(bins[keep], minlength=n)
    prof = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return (np.arange(n) + 0.5) * step, prof


def plot_gallery(volume: np.ndarray, vesicles: pd.DataFrame, path: Path, n: int = GALLERY_SIZE) -> Path:
    """The ``n`` worst-scored vesicles: central XY and XZ slices with the fitted circle, and radial profile."""
    return draw_gallery(gallery_panels(volume, vesicles, n), path)


def gallery_panels(volume: Any, vesicles: pd.DataFrame, n: int = GALLERY_SIZE) -> list[dict[str, Any]]:
    """What :func:`draw_gallery` shows of the ``n`` worst-scored vesicles: per vesicle its XY and XZ
    crops (with their offsets and the circle centre), its radial profile and its labels (small: a
    worker process can draw them)."""
    worst = vesicles.assign(_score=qc_score(vesicles)).sort_values("_score", ascending=False, kind="stable").head(n)
    panels = []
    for _, v in worst.iterrows():
        centre = np.array([v.z, v.y, v.x])
        half = int(np.ceil(v.radius * 1.6)) + 2
        zi, yi, xi = (int(round(q)) for q in centre)
        ys = slice(max(yi - half, 0), yi + half + 1)
        xs = slice(max(xi - half, 0), xi + half + 1)
        zs = slice(max(zi - half, 0), zi + half + 1)
        zi_c = min(max(zi, 0), volume.shape[0] - 1)
        yi_c = min(max(yi, 0), volume.shape[1] - 1)
        crops = [
            (np.asarray(volume[zi_c, ys, xs]), (ys.start, xs.start), (v.y, v.x)),
            (np.asarray(volume[zs, yi_c, xs]), (zs.start, xs.start), (v.z, v.x)),
        ]
        rr, prof = radial_profile(volume, centre, v.radius * 1.6)
        panels.append({"id": int(v.id), "radius": float(v.radius), "score": float(v._score), "crops": crops,
                       "profile": (rr, prof)})
    return panels


def draw_gallery(panels: list[dict[str, Any]], path: Path) -> Path:
    """The gallery figure of :func:`gallery_panels`, written to ``path``: per vesicle its XY and XZ
    crops side by side in one panel, and its radial profile."""
    plt = _plt()
    cols = 4
    rows = max(1, int(np.ceil(len(panels) / cols)))
    # one axes for both crops and few ticks: building and drawing the axes' ticks was most of the time
    fig, axes = plt.subplots(rows, cols * 2, figsize=(cols * 6.3, rows * 2.2), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1] * cols})
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, v in enumerate(panels):
        r, c = divmod(k, cols)
        a_im, a_pr = axes[r, 2 * c], axes[r, 2 * c + 1]
        left, height = 0.0, 1
        for img, (oy, ox), (cy, cx) in v["crops"]:
            if img.size == 0:
                continue
            lo, hi = _contrast(img)
            h, w = img.shape
            a_im.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                        extent=(left - 0.5, left + w - 0.5, h - 0.5, -0.5))
            _outline(a_im, np.array([cx - ox + left]), np.array([cy - oy]), np.array([v["radius"]]), "#00e5ff", 1.0,
                     clip=(left - 0.5, -0.5, w, h))  # each crop's circle stays on its crop
            left, height = left + w + 2, max(height, h)
        a_im.set_xlim(-0.5, max(left - 2, 1) - 0.5)
        a_im.set_ylim(height - 0.5, -0.5)
        # y given: matplotlib then skips placing titles clear of tick labels (these axes have none at
        # the top), which built every axis' ticks
        a_im.set_title(f"id {v['id']}: XY | XZ", fontsize=7, y=1.0)
        rr, prof = v["profile"]
        a_pr.set_axis_on()
        a_pr.plot(rr, prof, lw=1)
        a_pr.axvline(v["radius"], color="r", lw=0.8)
        a_pr.set_title(f"r={v['radius']:.1f} vx, score={v['score']:.2g}", fontsize=7, y=1.0)
        a_pr.set_yticks([])  # intensity in the tomogram's units: the shape is what matters
        a_pr.locator_params(axis="x", nbins=4)
        a_pr.tick_params(labelsize=6)
    fig.suptitle("worst-scored vesicles (flagged, then highest QC score first): XY | XZ, radial profile (red: fitted radius)")
    # fixed margins: tight_layout and a tight bounding box over ~50 axes took 0.7 of the gallery's 1.7 s
    height_in = rows * 2.2
    fig.subplots_adjust(left=0.01, right=0.995, bottom=0.3 / height_in, top=1 - 0.65 / height_in, wspace=0.15,
                        hspace=0.45)
    return _save(fig, path, tight=False)


def _levels_table(manifest: dict, vesicles: pd.DataFrame) -> pd.DataFrame:
    """The pyramid levels of the run (from the manifest) and the vesicles kept from each."""
    from cryoves.postprocess.scales import LEVEL_COLUMN

    rows = []
    for lv in manifest.get("prediction", {}).get("levels", []):
        grid_nm = round(lv["grid_voxel_a"] / 10.0, 3)
        n = int((vesicles[LEVEL_COLUMN].round(3) == grid_nm).sum()) if LEVEL_COLUMN in vesicles.columns else 0
        rows.append({"grid voxel (nm)": grid_nm, "looks for radius (nm)": round(lv["vesicle_radius_nm"], 1),
                     "keeps radii (nm)": f"{lv['min_radius_nm']:.1f}-{lv['max_radius_nm']:.1f}", "vesicles": n})
    return pd.DataFrame(rows)


def radius_bins(r: np.ndarray, n: int | None = None) -> tuple[np.ndarray, bool]:
    """Histogram bin edges for radii (nm): logarithmic when they span more than 3x (several
    populations), else linear. Returns (edges, log)."""
    r = np.asarray(r, float)
    n = n or min(40, max(5, len(r) // 4))
    lo, hi = float(r.min()), float(r.max())
    if hi > 3 * lo:
        return np.geomspace(lo * 0.95, hi * 1.05, n + 1), True
    return np.linspace(lo - 0.5, hi + 0.5, n + 1), False


def plot_radius_histogram(vesicles: pd.DataFrame, path: Path) -> Path:
    """Radius histogram, one colour per population (the pyramid level a vesicle was found on)."""
    from cryoves.postprocess.scales import LEVEL_COLUMN

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    r = vesicles["radius_nm"].to_numpy()
    log = False
    if len(r):
        bins, log = radius_bins(r)
        if LEVEL_COLUMN in vesicles.columns and vesicles[LEVEL_COLUMN].nunique() > 1:
            groups = sorted(vesicles.groupby(LEVEL_COLUMN)["radius_nm"])
            # filled outlines, not bars: one polygon per population instead of a patch per bin (3x faster)
            ax.hist([g.to_numpy() for _, g in groups], bins=bins, stacked=True, histtype="stepfilled",
                    label=[f"{lvl:g} nm grid: n={len(g)}, median {g.median():.1f} nm" for lvl, g in groups])
        else:
            ax.hist(r, bins=bins, color="#3a7bd5", histtype="stepfilled")
        ax.axvline(np.median(r), color="k", ls="--", lw=1, label=f"median {np.median(r):.1f} nm")
        ax.legend(fontsize=7)
        if log:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ticks = [t for t in (5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 500) if bins[0] <= t <= bins[-1]]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("outer radius (nm)" + (", log scale" if log else ""))
    ax.set_ylabel("vesicles")
    ax.set_title(f"radius distribution (n = {len(r)})")
    return _save(fig, path)


def plot_outliers(vesicles: pd.DataFrame, rejected: pd.DataFrame, path: Path) -> Path:
    """Radius × membrane thickness × membrane density, coloured by the χ² p-value."""
    plt = _plt()
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    need = {"membrane_thickness_nm", "membrane_density"}
    if need <= set(vesicles.columns) and len(vesicles):
        p = vesicles["p_value"].to_numpy() if "p_value" in vesicles else np.ones(len(vesicles))
        sc = ax.scatter(
            vesicles["radius_nm"], vesicles["membrane_thickness_nm"], vesicles["membrane_density"],
            c=p, cmap="viridis", vmin=0, vmax=1, s=12,
        )
        fig.colorbar(sc, ax=ax, shrink=0.6, label="p-value")
        if len(rejected) and "step" in rejected and need <= set(rejected.columns):
            out = rejected[rejected["step"] == "outliers"]
            if len(out):
                ax.scatter(
                    out["radius"] * _nm_per_voxel(vesicles), out["membrane_thickness_nm"], out["membrane_density"],
                    marker="x", color="red", s=20, label="removed outliers",
                )
                ax.legend()
    ax.set_xlabel("radius (nm)")
    ax.set_ylabel("thickness (nm)")
    ax.set_zlabel("membrane density")
    ax.set_title("outlier features")
    return _save(fig, path)


def _nm_per_voxel(df: pd.DataFrame) -> float:
    ok = df["radius"] > 0
    return float((df.loc[ok, "radius_nm"] / df.loc[ok, "radius"]).median()) if ok.any() else 1.0


class _Negated:
    """``-volume``, computed only for the parts the figures read (no copy of the whole tomogram)."""

    def __init__(self, volume: Any):
        self._volume = volume
        self.shape = volume.shape
        self._mmap = getattr(volume, "_mmap", None)  # release_pages reaches the file's pages

    def __getitem__(self, index: Any) -> np.ndarray:
        return -np.asarray(self._volume[index])


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table_html(df: pd.DataFrame, max_rows: int = 200) -> str:
    if df is None or not len(df):
        return "<p><em>none</em></p>"
    more = f"<p>… {len(df) - max_rows} more rows in the CSV.</p>" if len(df) > max_rows else ""
    return df.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0, classes="t") + more


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1300px;color:#222}
h1{margin-bottom:0} .sub{color:#666;margin-top:.2em} figure{margin:1em 0} img{max-width:100%}
figcaption{color:#666;font-size:.85em} table.t{border-collapse:collapse;font-size:.85em}
table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
.kpi{display:inline-block;margin:0 1.5em .5em 0}.kpi b{font-size:1.6em;display:block}
section{margin-top:2em} pre{background:#f5f5f5;padding:1em;overflow:auto;font-size:.8em}
"""


def make_report(
    outdir: str | os.PathLike,
    *,
    tomogram: str | os.PathLike | None = None,
    ground_truth: str | os.PathLike | None = None,
    analysis: bool = True,
    volume: Any = None,
) -> Path:
    """Write ``outdir/report.html`` and ``outdir/report/*.png`` for a segmentation folder; return the HTML path.

    ``volume``: the segmented tomogram's voxels, already at hand (an array or memory map, as in the
    file): the tomogram is then not read again."""
    from cryoves.io import read_tomogram

    outdir = Path(outdir)
    try:
        manifest = read_manifest(outdir)
    except CryovesError as exc:
        raise InputError(f"{outdir} holds no complete segmentation result ({MANIFEST_NAME} unreadable): {exc}") from exc
    if manifest is None:
        raise InputError(f"{outdir} holds no complete segmentation result (no {MANIFEST_NAME})")
    result = open_result(outdir)
    manifest, table, rejected, vs = result.manifest, result.vesicles, result.rejected.df, result.voxel_size_a
    tomo_path = tomogram or result.tomogram_path
    if volume is None:
        if not tomo_path or not Path(tomo_path).exists():
            raise InputError(f"tomogram {tomo_path} not found; pass --tomogram PATH")
        volume = read_tomogram(tomo_path, voxel_size=vs).data
    if manifest.get("prediction", {}).get("inverted"):
        volume = _Negated(volume)  # show dense = dark, as the fits saw it
    figdir = outdir / REPORT_DIR
    figdir.mkdir(exist_ok=True)
    df = table.df
    misses = fps = None
    eval_html = ""
    if ground_truth is not None:
        from cryoves.evaluate import evaluate

        gt = VesicleTable.read_csv(ground_truth)
        prob = None
        if "probability" in result.paths:
            from cryoves.io import read_mrc

            prob = read_mrc(result.paths["probability"], validate=False).asarray()
        res = evaluate(table, gt, shape=volume.shape, prob=prob)
        misses, fps = res.misses, res.false_positives
        metrics = pd.DataFrame([res.metrics]).T.reset_index()
        metrics.columns = ["metric", "value"]
        eval_html = (
            "<section><h2>Evaluation against ground truth</h2>" + _table_html(metrics)
            + f"<h3>Misses ({len(misses)})</h3>" + _table_html(misses)
            + f"<h3>False positives ({len(fps)})</h3>" + _table_html(fps) + "</section>"
        )
    # the gallery (the largest figure) is drawn by a worker process while this one draws the others
    gallery = parallel.submit(draw_gallery, gallery_panels(volume, df), figdir / "gallery.png")
    figs = [
        (plot_slices(volume, df, figdir / "slices.png", misses, fps), "orthogonal slices with vesicle outlines"),
        (plot_radius_histogram(df, figdir / "radius_histogram.png"), "radius histogram"),
        (plot_outliers(df, rejected, figdir / "outliers.png"), "outlier scatter"),
    ]
    figs.insert(1, (gallery(), "worst-scored vesicles"))
    analysis_html = ""
    if analysis and "active_zone_mask" in result.paths:
        analysis_html = _analysis_section(result, figdir)
    reasons = rejected.groupby(["step", "reason"]).size().reset_index(name="count") if len(rejected) else pd.DataFrame()
    timings = pd.DataFrame(sorted(manifest.get("timings_s", {}).items()), columns=["step", "seconds"])
    kpis = "".join(
        f'<span class="kpi"><b>{html.escape(str(v))}</b>{html.escape(k)}</span>'
        for k, v in (
            ("vesicles", len(df)),
            ("rejected candidates", len(rejected)),
            ("median radius (nm)", f"{df['radius_nm'].median():.1f}" if len(df) else "-"),
            ("threshold", f"{manifest.get('threshold', float('nan')):.2f}"),
            ("total time (s)", f"{sum(manifest.get('timings_s', {}).values()):.1f}"),
        )
    )
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>cryoves report: {html.escape(str(tomo_path))}</title>
<style>{_CSS}</style></head><body>
<h1>cryoves segmentation report</h1><p class="sub">{html.escape(str(tomo_path))} — cryoves {html.escape(str(manifest.get('cryoves_version')))}, {html.escape(str(manifest.get('created')))}</p>
<div>{kpis}</div>
<section><h2>Slices</h2>{_img_tag(figs[0][0], figs[0][1])}</section>
{eval_html}
<section><h2>Worst-scored vesicles</h2>{_img_tag(figs[1][0], figs[1][1])}</section>
<section><h2>Radius and outlier features</h2>{_img_tag(figs[2][0], figs[2][1])}{_img_tag(figs[3][0], figs[3][1])}
<h3>Size search (network grids)</h3>{_table_html(_levels_table(manifest, df))}</section>
{analysis_html}
<section><h2>Rejected candidates ({len(rejected)})</h2>{_table_html(reasons)}<details><summary>all rejected candidates</summary>{_table_html(rejected)}</details></section>
<section><h2>Timings</h2>{_table_html(timings)}</section>
<section><h2>Parameters</h2><pre>{html.escape(json.dumps(manifest.get('parameters', {}), indent=2))}</pre>
<h3>Prediction</h3><pre>{html.escape(json.dumps(manifest.get('prediction', {}), indent=2))}</pre></section>
</body></html>"""
    return write_text_atomic(outdir / REPORT_NAME, body)


def _analysis_section(result: Result, figdir: Path) -> str:
    from cryoves.analysis import analyze, write_analysis
    from cryoves.io import read_mrc

    az = read_mrc(result.paths["active_zone_mask"], validate=False).asarray(np.uint8) > 0
    cyto = None
    if "cytoplasm_mask" in result.paths:
        cyto = read_mrc(result.paths["cytoplasm_mask"], validate=False).asarray(np.uint8) > 0
    res = analyze(result.vesicles, az_mask=az, cytoplasm_mask=cyto)
    written = write_analysis(res, result.path / "analysis", force=True)  # a derived view: always refreshed
    pngs = sorted(written.glob("*.png"))
    summary_html = _table_html(pd.DataFrame([res.summary]).T.reset_index())
    return "<section><h2>Synapse analysis</h2>" + summary_html + "".join(_img_tag(p, p.stem) for p in pngs) + "</section>"
