"""The ``cryoves`` command line: thin wrappers over the library, one function per command.

Library errors (:class:`cryoves.errors.CryovesError`) become one line on stderr and exit code 2;
``cryoves --debug ...`` shows the full traceback instead.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from cryoves import DEFAULT_MODEL, __version__
from cryoves.errors import CryovesError

log = logging.getLogger("cryoves")

_STATE = {"debug": False}


class _Group(TyperGroup):
    """Turns library errors into one line + exit code 2 (also under ``typer.testing.CliRunner``)."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CryovesError as exc:
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # broad on purpose: last resort: no traceback without --debug
            if _STATE["debug"] or isinstance(exc, _click_exceptions()) or _reader_gone(exc):
                raise  # click ends quietly (exit code 1) when the reader of stdout went away
            typer.echo(
                f"internal error: {type(exc).__name__}: {_one_line(exc)} (run 'cryoves --debug ...' "
                "for the traceback and please report it)",
                err=True,
            )
            raise typer.Exit(1) from None


def _reader_gone(exc: BaseException) -> bool:
    """``exc`` is a broken pipe on stdout (``cryoves ... --help | head``), not on another pipe
    (e.g. to a worker process, which is an internal error)."""
    if not isinstance(exc, BrokenPipeError):
        return False
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False


def _click_exceptions() -> tuple[type[BaseException], ...]:
    """Click's usage/exit exceptions; recent typer versions vendor click as ``typer._click``."""
    import importlib

    found: list[type[BaseException]] = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        found += [c for c in (getattr(mod, n, None) for n in ("ClickException", "Exit", "Abort")) if c is not None]
    return tuple(found)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


app = typer.Typer(
    cls=_Group,
    name="cryoves",
    help="Find every synaptic vesicle in a cryo-electron tomogram, as exact spheres.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryoves {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    _STATE["debug"] = debug
    level = logging.WARNING if quiet else (logging.INFO if verbose <= 1 else logging.DEBUG)
    _configure_logging(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap and close it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(level: int) -> None:
    """Log cryoves messages to stderr at ``level``; other libraries keep their own settings."""
    logger = logging.getLogger("cryoves")
    for h in list(logger.handlers):
        if isinstance(h, _StderrHandler):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


# Commands are grouped by pipeline stage below; each is a thin wrapper over a library function.

VoxelSizeOpt = Annotated[
    Optional[float],
    typer.Option("--voxel-size", help="Voxel size in Å; overrides the file header."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing result.")]

# Options of the network and of SegmentConfig, declared once for predict, segment, batch and demo.
ModelOpt = Annotated[
    str,
    typer.Option("--model", help="Registered model name (cryoves-default, packaged; cryovesnet, downloaded once) "
                 "or a weight file (.h5/.safetensors/.pt)."),
]
InvertOpt = Annotated[
    Optional[bool], typer.Option("--invert/--no-invert", help="Force contrast inversion on/off (default: detect).")
]
VesicleRadiusOpt = Annotated[
    Optional[float],
    typer.Option("--vesicle-radius", help="Size hint, nm: one network pass at the scale where vesicles of this "
                 "radius look like the training vesicles, instead of the automatic size search."),
]
TtaOpt = Annotated[
    int,
    typer.Option("--tta", help="Test-time augmentations, 1-16: the first N of the 16 combinations of a 90° "
                 "rotation in (y, x), a flip of x and a flip of z (z is never swapped with y or x)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available, else CPU), cpu or cuda[:N].")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto (bf16/fp16 on CUDA; bf16 on CPUs with AMX, else fp32), fp32, bf16, or fp16 on CUDA.")
]
WholeVolumeOpt = Annotated[
    bool, typer.Option("--whole-volume", help="Run the network on every slice, also on the vacuum above and below "
                       "the specimen slab (skipped by default; docs/models.md).")
]
TileOpt = Annotated[
    Optional[int], typer.Option("--tile", help="Tile side in model voxels (multiple of 4; default: from memory).")
]
RadiusRangeOpt = Annotated[
    Optional[tuple[float, float]],
    typer.Option("--radius-range", metavar="MIN MAX",
                 help="Vesicle radii searched and kept, nm (default 12 90; with --vesicle-radius 12 to "
                 "max(90, 2.5 x hint)). Sizes are found automatically within it (docs/sizes.md)."),
]
ThresholdOpt = Annotated[
    Optional[float],
    typer.Option("--threshold", help="Fixed global probability threshold (default: searched in the range stored "
                 "with the model: 0.30-0.99 for cryoves-default, 0.80-0.99 for cryovesnet)."),
]
MaskOpt = Annotated[
    Optional[Path], typer.Option("--mask", help="Cytoplasm mask volume (non-zero = region), instead of --mask-model.")
]
AzMaskOpt = Annotated[Optional[Path], typer.Option("--az-mask", help="Active-zone mask volume, instead of --az-model.")]
MaskModelOpt = Annotated[
    Optional[Path], typer.Option("--mask-model", help="IMOD model: closed contours outlining the cytoplasm.")
]
AzModelOpt = Annotated[Optional[Path], typer.Option("--az-model", help="IMOD model: open contours along the active zone.")]


def _radius_range(value: tuple[float, float] | None) -> tuple[float, float] | None:
    """--radius-range as given (None when absent), checked before any file is read."""
    if value is None or all(v is None for v in value):
        return None
    from cryoves.postprocess.scales import check_radius_range

    return check_radius_range(value)


# --------------------------------------------------------------------------- files: info / convert
@app.command("info")
def info_cmd(
    tomogram: Annotated[Path, typer.Argument(help="Tomogram: .mrc/.rec, .tif/.tiff or an OME-Zarr folder.")],
    voxel_size: VoxelSizeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Shape, dtype, voxel size, value range, memory estimate and header problems of a tomogram."""
    import json

    from cryoves.io import format_tomogram_info, tomogram_info

    info = tomogram_info(tomogram, voxel_size=voxel_size)
    typer.echo(json.dumps(info, indent=2) if as_json else format_tomogram_info(info))


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Input: vesicle table (.csv/.star/.mod) or label volume (.mrc/.tif/.zarr).")],
    dst: Annotated[Path, typer.Argument(help="Output file; its suffix picks the format (.csv/.star/.mod/.mrc/.tif/.zarr).")],
    to: Annotated[Optional[str], typer.Option("--to", help="Output kind: table, labels or pyto (default: from the suffix).")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Input kind: table, labels or pyto (default: from the suffix; a volume with a .ids.json sidecar is pyto).")] = None,
    pyto: Annotated[bool, typer.Option("--pyto", help="Write a pyto label file (same as --to pyto).")] = False,
    shape: Annotated[Optional[tuple[int, int, int]], typer.Option("--shape", help="Grid Z Y X for table → volume.")] = None,
    like: Annotated[Optional[Path], typer.Option("--like", help="Tomogram whose grid, voxel size and origin are used for table → volume.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Cytoplasm mask volume, painted 1 in a pyto file.")] = None,
    az_mask: Annotated[Optional[Path], typer.Option("--az-mask", help="Active-zone mask volume, painted 2 in a pyto file.")] = None,
    cytoplasm: Annotated[Optional[Path], typer.Option("--cytoplasm", hidden=True, help="Deprecated: --mask.")] = None,
    active_zone: Annotated[Optional[Path], typer.Option("--active-zone", hidden=True, help="Deprecated: --az-mask.")] = None,
    voxel_size: VoxelSizeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert vesicles: table (.csv/.star/.mod) ↔ label volume ↔ pyto labels (see docs/formats.md)."""
    from cryoves.io.tables import convert_vesicles

    cytoplasm = _renamed(mask, cytoplasm, "--cytoplasm", "--mask")
    active_zone = _renamed(az_mask, active_zone, "--active-zone", "--az-mask")

    out = convert_vesicles(
        src, dst, to="pyto" if pyto else to, from_=from_, shape=shape, like=like, voxel_size=voxel_size,
        cytoplasm=cytoplasm, active_zone=active_zone, force=force,
    )
    typer.echo(f"wrote {out}")


def _renamed(new: Optional[Path], old: Optional[Path], old_name: str, new_name: str) -> Optional[Path]:
    """The value of an option that was renamed, given under either name."""
    if old is None:
        return new
    if new is not None:
        raise typer.BadParameter(f"give {new_name} only ({old_name} is its old name)")
    log.warning("%s is deprecated; use %s", old_name, new_name)
    return old


# --------------------------------------------------------------------------- evaluation / analysis
@app.command("evaluate")
def evaluate_cmd(
    pred: Annotated[Path, typer.Argument(help="Predicted vesicles: vesicle CSV, label MRC or a result folder.")],
    gt: Annotated[Path, typer.Argument(help="Ground truth: vesicle CSV or label MRC.")],
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Region mask; vesicles centred outside are ignored.")] = None,
    prob: Annotated[Optional[Path], typer.Option("--prob", help="Probability map for the soft Dice.")] = None,
    like: Annotated[Optional[Path], typer.Option("--like", help="Tomogram whose grid is used to count voxels of two tables.")] = None,
    min_label: Annotated[Optional[int], typer.Option("--min-label", help="Label ids below this are background (10 for pyto/CryoVesNet labels; default: from a pyto .ids.json, else 1).")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON to this file.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for evaluation.json and match/miss/FP CSVs.")] = None,
    voxel_size: VoxelSizeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Compare predicted vesicles with ground truth (F1 by centre and by IoU>=0.5, Dice, SBD, δd, Δc)."""
    from cryoves.atomic import check_file_output
    from cryoves.evaluate import evaluate_files, write_evaluation

    if json_file is not None:
        check_file_output(json_file, force=force)
    result = evaluate_files(pred, gt, mask=mask, prob=prob, like=like, voxel_size=voxel_size, min_label=min_label)
    typer.echo(result.report())
    if json_file is not None:
        result.to_json(json_file)
    if output is not None:
        write_evaluation(result, output, force=force)


@app.command("analyze")
def analyze_cmd(
    folder: Annotated[Path, typer.Argument(help="Segmentation output folder (vesicles.csv, optional AZ/cytoplasm masks).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for the analysis (default FOLDER/analysis).")] = None,
    az_model: Annotated[Optional[Path], typer.Option("--az-model", help="IMOD model of the active zone (open contours).")] = None,
    voxel_size: VoxelSizeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Distances to the active zone, neighbour distances, pools within 45/250 nm, density profile."""
    from cryoves.analysis import analyze_folder

    result = analyze_folder(folder, output=output, voxel_size=voxel_size, az_model=az_model, force=force)
    typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.summary.items()))


@app.command("predict")
def predict_cmd(
    tomogram: Annotated[Path, typer.Argument(help="Tomogram (MRC/REC, TIFF or OME-Zarr), dense = dark or bright.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Probability map to write (.mrc or .npy), on the tomogram grid.")],
    model: ModelOpt = DEFAULT_MODEL,
    voxel_size: VoxelSizeOpt = None,
    invert: InvertOpt = None,
    vesicle_radius: VesicleRadiusOpt = None,
    device: DeviceOpt = "auto",
    tta: TtaOpt = 1,
    precision: PrecisionOpt = "auto",
    tile: TileOpt = None,
    whole_volume: WholeVolumeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run the U-Net on TOMOGRAM and write the vesicle probability map (float32, 0-1).

    Beside the map, OUTPUT.json names the model (and its threshold range) and the contrast
    inversion, for 'cryoves segment --from-probability OUTPUT'.
    """
    from cryoves.predict import predict_file

    res = predict_file(tomogram, output, voxel_size=voxel_size, model=model, invert=invert,
                       vesicle_radius_nm=vesicle_radius, device=device, tta=tta, precision=precision,
                       tile=tile, skip_vacuum=not whole_volume, force=force)
    i = res.info
    typer.echo(f"{i['model']} on {i['device']} ({i['precision']}), {i['tiles']} tiles, "
               f"inverted={i['inverted']} ({_polarity_note(i['polarity_score'])}), "
               f"{i['seconds']:.1f} s -> {output}")


def _polarity_note(score: float | None) -> str:
    return "as given" if score is None else f"polarity score {score:.3f}"


@app.command("segment")
def segment_cmd(
    tomogram: Annotated[Path, typer.Argument(help="Tomogram (MRC/REC, TIFF or OME-Zarr), dense = dark or bright.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (created).")],
    voxel_size: VoxelSizeOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    mask_model: MaskModelOpt = None,
    mask: MaskOpt = None,
    az_model: AzModelOpt = None,
    az_mask: AzMaskOpt = None,
    invert: InvertOpt = None,
    vesicle_radius: VesicleRadiusOpt = None,
    radius_range: RadiusRangeOpt = None,
    threshold: ThresholdOpt = None,
    from_probability: Annotated[Optional[Path], typer.Option("--from-probability", help="Start after the network from this probability map (tomogram grid); the model and inversion come from the MAP.json 'cryoves predict' wrote beside it.")] = None,
    tta: TtaOpt = 1,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    tile: TileOpt = None,
    whole_volume: WholeVolumeOpt = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Split this (huge) tomogram across N local Dask workers (docs/batch.md).")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Split this tomogram across the workers of this Dask scheduler.")] = None,
    force: ForceOpt = False,
) -> None:
    """Segment the vesicles of TOMOGRAM into exact spheres; write tables, labels, IMOD and pyto files."""
    from cryoves.checksum import hash_in_background

    # on the core that idles while this process imports the pipeline: the input's checksum and the
    # post-processing workers' server (its imports and compiled kernels)
    hash_in_background(tomogram)
    if workers is None and scheduler is None:
        from cryoves import parallel

        parallel.warm_up()
    from cryoves.pipeline import SegmentConfig, segment

    cfg = SegmentConfig(
        model=model,
        voxel_size=voxel_size,
        mask_model=str(mask_model) if mask_model else None,
        mask=str(mask) if mask else None,
        az_model=str(az_model) if az_model else None,
        az_mask=str(az_mask) if az_mask else None,
        invert=invert,
        vesicle_radius_nm=vesicle_radius,
        radius_range_nm=_radius_range(radius_range),
        threshold=threshold,
        from_probability=str(from_probability) if from_probability else None,
        tta=tta,
        device=device,
        precision=precision,
        tile=tile,
        whole_volume=whole_volume,
    )
    if workers is not None or scheduler is not None:
        from cryoves.blockwise import segment_split

        res = segment_split(tomogram, output, cfg, workers=workers, scheduler=scheduler, force=force)
    else:
        res = segment(tomogram, output, cfg, force=force, progress=_freeze_objects)
    t = res.manifest["timings_s"]
    typer.echo(
        f"{len(res.vesicles)} vesicles ({len(res.rejected)} candidates rejected) in {sum(t.values()):.1f} s "
        f"-> {output}"
    )


@app.command("simulate")
def simulate_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (created).")],
    preset: Annotated[str, typer.Option("--preset", help="synapse, small, large-vesicles, dense-core, dense-pool, uncorrected, phase-flipped, mixed-sizes or vlp.")] = "synapse",
    randomize: Annotated[bool, typer.Option("--randomize", help="Draw all settings from broad ranges (seeded).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same tomogram.")] = 0,
    shape: Annotated[
        Optional[tuple[int, int, int]], typer.Option("--shape", help="Volume size Z Y X in voxels.")
    ] = None,
    voxel_size: Annotated[Optional[float], typer.Option("--voxel-size", help="Voxel size in Å (5-50).")] = None,
    force: ForceOpt = False,
) -> None:
    """Simulate a tomogram with exact ground truth (vesicle table, labels, masks, noise-free scene)."""
    from cryoves.simulate import simulate_to_folder

    sim = simulate_to_folder(output, preset=preset, randomize=randomize, seed=seed, shape=shape,
                             voxel_size_a=voxel_size, force=force)
    typer.echo(f"{len(sim.vesicles)} vesicles, shape {sim.tomogram.shape}, "
               f"{sim.tomogram.voxel_size_a:g} Å/voxel -> {output}")


@app.command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (created).")] = Path("demo-out"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the simulated tomogram.")] = 1,
    model: ModelOpt = DEFAULT_MODEL,
    force: ForceOpt = False,
) -> None:
    """Simulate a small synapse tomogram, segment it end to end, and score the result against its ground truth."""
    from cryoves.demo import run_demo

    res = run_demo(output, seed=seed, force=force, model=model)
    m = res["metrics"]
    typer.echo(
        f"vesicles: {m['n_pred']} found, {m['n_gt']} true | F1 (centre) {m['f1_centre']:.3f} | "
        f"F1 (IoU>=0.5) {m['f1_iou50']:.3f} | Dice {m['dice']:.3f} | centre error {m['delta_c_nm_mean']:.2f} nm | "
        f"diameter deviation {m['delta_d']:.3f}"
    )
    typer.echo(f"tomogram + ground truth: {res['simulation']}")
    typer.echo(f"segmentation:            {res['segmentation']}")
    typer.echo(f"scores:                  {res['evaluation']}")


@app.command("batch")
def batch_cmd(
    inputs: Annotated[list[str], typer.Argument(help="Tomogram files, folders, glob patterns, or CSV/YAML manifests.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output root: one folder per tomogram.")],
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of an existing Dask scheduler.")] = None,
    slurm: Annotated[Optional[Path], typer.Option("--slurm", help="YAML with dask-jobqueue SLURMCluster settings (docs/batch.md).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Local workers (default: sized to cores and memory).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    voxel_size: VoxelSizeOpt = None,
    invert: InvertOpt = None,
    vesicle_radius: VesicleRadiusOpt = None,
    radius_range: RadiusRangeOpt = None,
    threshold: ThresholdOpt = None,
    tta: TtaOpt = 1,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    tile: TileOpt = None,
    whole_volume: WholeVolumeOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Redo tomograms that already have a complete result.")] = False,
) -> None:
    """Segment many tomograms on Dask; resumable, one failure never stops the batch."""
    from rich.console import Console
    from rich.table import Table

    from cryoves.batch import SUMMARY_NAME, run_batch
    from cryoves.pipeline import SegmentConfig

    cfg = SegmentConfig(model=model, voxel_size=voxel_size, invert=invert, vesicle_radius_nm=vesicle_radius,
                        radius_range_nm=_radius_range(radius_range), threshold=threshold, tta=tta, device=device, precision=precision,
                        tile=tile, whole_volume=whole_volume)
    summary = run_batch(inputs, output, cfg, scheduler=scheduler, slurm=slurm, n_workers=workers, force=force)
    table = Table(title=f"cryoves batch -> {output / SUMMARY_NAME}")
    for col in ("tomogram", "status", "n_vesicles", "seconds", "error"):
        table.add_column(col)
    for row in summary.itertuples():
        n = "" if row.n_vesicles is None or row.n_vesicles != row.n_vesicles else str(int(row.n_vesicles))
        table.add_row(Path(row.tomogram).name, row.status, n, f"{row.seconds:.1f}", str(row.error or ""))
    Console(stderr=False).print(table)
    failed = int((summary["status"] == "failed").sum())
    if failed:
        typer.echo(f"error: {failed} of {len(summary)} tomograms failed (see {output / SUMMARY_NAME}); fix them "
                   "and rerun the same command (finished tomograms are skipped)", err=True)
        raise typer.Exit(2)


@app.command("report")
def report_cmd(
    outdir: Annotated[Path, typer.Argument(help="A segmentation output folder (from cryoves segment).")],
    tomogram: Annotated[Optional[Path], typer.Option("--tomogram", help="Tomogram, if it moved since segmentation.")] = None,
    ground_truth: Annotated[Optional[Path], typer.Option("--ground-truth", help="Ground-truth vesicle CSV: adds the evaluation table.")] = None,
) -> None:
    """Write OUTDIR/report.html (self-contained, opens offline) and the PNGs in OUTDIR/report/."""
    from cryoves.report import make_report

    path = make_report(outdir, tomogram=tomogram, ground_truth=ground_truth)
    typer.echo(f"report: {path}")


@app.command("review")
def review_cmd(
    outdir: Annotated[Path, typer.Argument(help="A segmentation output folder (from cryoves segment).")],
    recover: Annotated[
        Optional[bool],
        typer.Option("--recover/--no-recover", help="Continue unsaved edits of a crashed session (default: when found)."),
    ] = None,
) -> None:
    """Open napari on OUTDIR to review and correct the vesicles (needs the napari extra of cryoves).

    Edits are autosaved to a recovery file; Save writes OUTDIR/reviewed/ (the automatic result is kept).
    """
    from cryoves.napari import review

    review(outdir, recover=recover)


# --------------------------------------------------------------------------- training
@app.command("train")
def train_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML recipe (see recipes/cryoves-default.yaml); flags override it.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Run folder (checkpoints, history, curve).")] = None,
    tomogram: Annotated[Optional[list[Path]], typer.Option("--tomogram", help="Real training tomogram (repeatable).")] = None,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="Its labels: label volume, vesicle table (.csv/.star/.mod); one per --tomogram.")] = None,
    mask: Annotated[Optional[list[Path]], typer.Option("--mask", help="Region where labels are complete (loss ignores the rest); one per --tomogram.")] = None,
    val_tomogram: Annotated[Optional[list[Path]], typer.Option("--val-tomogram", help="Held-out validation tomogram (repeatable).")] = None,
    val_labels: Annotated[Optional[list[Path]], typer.Option("--val-labels", help="Labels of each --val-tomogram.")] = None,
    voxel_size: VoxelSizeOpt = None,
    invert: Annotated[Optional[bool], typer.Option("--invert/--no-invert", help="Real data are dense = bright (default: detect).")] = None,
    simulated: Annotated[Optional[float], typer.Option("--simulated", help="Share of patches from simulated tomograms, 0-1 (default 1 without real data).")] = None,
    sim_pool: Annotated[Optional[int], typer.Option("--sim-pool", help="Number of simulated training volumes.")] = None,
    sim_val: Annotated[Optional[int], typer.Option("--sim-val", help="Number of simulated validation volumes.")] = None,
    sim_preset: Annotated[Optional[str], typer.Option("--sim-preset", help="'randomize' (default) or a simulate preset name.")] = None,
    sim_cache: Annotated[Optional[Path], typer.Option("--sim-cache", help="Folder caching simulated volumes (default OUTPUT/sim-cache).")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Fine-tune this model (registry name or weight file).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    patch_size: Annotated[Optional[int], typer.Option("--patch-size", help="Cubic patch side (model voxels).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (AdamW).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Model name stored in the metadata.")] = None,
    export: Annotated[Optional[Path], typer.Option("--export", help="Also write the best model to STEM.safetensors + STEM.json.")] = None,
    time_limit: Annotated[Optional[float], typer.Option("--time-limit", help="Stop after this many minutes.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto, fp32 or bf16.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train or fine-tune the vesicle U-Net on real and/or simulated tomograms."""
    from cryoves.train import build_config, train

    cfg = build_config(
        config, output=output, tomograms=tomogram, labels=labels, masks=mask, val_tomograms=val_tomogram,
        val_labels=val_labels, voxel_size=voxel_size, invert=invert, simulated=simulated, init=init,
        steps=steps, batch_size=batch_size, patch_size=patch_size, lr=lr, seed=seed, name=name,
        export=None if export is None else str(export), time_limit_min=time_limit, device=device,
        precision=precision, sim_pool=sim_pool, sim_val=sim_val, sim_preset=sim_preset,
        sim_cache=None if sim_cache is None else str(sim_cache),
    )
    result = train(cfg, resume=resume, force=force)
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f} s; best {cfg.val_metric} "
               f"{result.best_metric:.3f}; model: {result.best_checkpoint}")


_OWN_PROCESS = False  # set by main(): the process ends with the command


def _freeze_objects(*_step) -> None:
    """In a process that ends after its command: exempt every object alive now from the cyclic
    garbage collector (``gc.freeze``).

    The modules (torch, pandas, scipy, ...) hold ~370,000 objects; every full collection walks
    them all (7 during a `segment` of the 200x400x400 speed tomogram: 0.7-0.9 s) and so does the
    last one when the interpreter exits (1.2 s). Frozen objects are still freed when their
    reference count drops; only cyclic garbage alive at that moment waits for the process end,
    which is why a host process (tests, notebooks calling ``app``) is left alone.
    """
    if _OWN_PROCESS:
        gc.freeze()


def main() -> None:
    """Console-script entry point."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    try:
        app()
    finally:
        _freeze_objects()


if __name__ == "__main__":  # pragma: no cover
    main()
