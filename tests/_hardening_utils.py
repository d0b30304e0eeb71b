"""The bad-input catalogue: shared by tests/test_bad_inputs.py and bench/bad_input_messages.py.

A :class:`Case` builds its (bad) files in ``<tmp>/in`` and says which commands it applies to and
what they must print. :func:`run_cli` / :func:`run_api` run one command of a case through the
command line (in-process, ``typer.testing.CliRunner``) and through the Python API.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

SHAPE = (32, 48, 48)
VS = 22.0
BATCH_SUMMARY = "batch_summary.csv"


# ------------------------------------------------------------------------------------ files
def noise(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def shells(shape=SHAPE, dark: bool = True, seed: int = 0) -> np.ndarray:
    """Thin spherical shells (dense = dark by default) in noise: a tomogram with clear polarity."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    v = np.zeros(shape, np.float32)
    for _ in range(5):
        c = [rng.uniform(8, s - 8) for s in shape]
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        v -= np.exp(-((d - rng.uniform(4, 6)) ** 2) / 2)
    v = ndimage.gaussian_filter(v, 1.0) + rng.normal(0, 0.3, shape).astype(np.float32)
    return (v if dark else -v).astype(np.float32)


def write_raw_mrc(path: Path, data: np.ndarray, voxel_size: Any = VS) -> Path:
    """MRC writer that stores the header voxel size as given (even 0 or negative)."""
    with mrcfile.new(path, overwrite=True) as m, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Data array contains NaN", RuntimeWarning)
        m.set_data(np.ascontiguousarray(data))
        vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
        m.voxel_size = (vs[2], vs[1], vs[0])
    return path


def good_tomogram(d: Path, name: str = "tomo.mrc", data: np.ndarray | None = None, vs: Any = VS) -> Path:
    return write_raw_mrc(d / name, noise() if data is None else data, vs)


def good_table(d: Path, name: str = "vesicles.csv", centres=None, radii=None) -> Path:
    from cryoves.vesicles import VesicleTable

    centres = [[10.0, 20.0, 20.0], [20.0, 30.0, 25.0]] if centres is None else centres
    radii = [4.0, 5.0] if radii is None else radii
    return VesicleTable.from_spheres(np.asarray(centres, float), np.asarray(radii, float), VS).write_csv(d / name)


def patch_header(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


def imod_file(d: Path, name: str, kind: str, points, shape_zyx=SHAPE) -> Path:
    from cryoves.io.imod import ImodContour, ImodModel, ImodObject, write_mod

    obj = ImodObject.of_kind(kind, contours=[ImodContour(points=np.asarray(points, float))])
    nz, ny, nx = shape_zyx
    return write_mod(d / name, ImodModel(objects=[obj], xmax=nx, ymax=ny, zmax=nz, pixel_size=VS / 10, units=-9))


def snapshot(root: Path) -> dict[str, str]:
    """Relative path → sha256 (files) or 'dir' for everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------ cases
@dataclass
class Setup:
    """What one case hands to the command runners (paths are absolute)."""

    files: dict[str, Any]
    patch: Callable[[str], contextlib.AbstractContextManager] | None = None
    """``patch(command)``: a context manager that simulates an environment fault."""


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[Path], Setup]
    commands: tuple[str, ...]
    expect: str
    """Regex the one-line message must match (case-insensitive); per command in ``expect_for``."""
    code: int = 2
    expect_for: dict[str, str] = field(default_factory=dict)
    code_for: dict[str, int] = field(default_factory=dict)

    def pattern(self, command: str) -> str:
        return self.expect_for.get(command, self.expect)

    def exit_code(self, command: str) -> int:
        return self.code_for.get(command, self.code)


CASES: list[Case] = []


def case(name: str, commands: str, expect: str, code: int = 2, expect_for=None, code_for=None):
    def deco(fn: Callable[[Path], Setup]) -> Callable[[Path], Setup]:
        CASES.append(Case(name, (fn.__doc__ or "").strip(), fn, tuple(commands.split()), expect, code,
                          dict(expect_for or {}), dict(code_for or {})))
        return fn

    return deco


ALL_TOMO = "info predict segment batch convert evaluate"
READERS = "info predict segment batch"


def _tomo_setup(path: Path, **extra) -> Setup:
    """A bad file used as the tomogram (info/predict/segment/batch) and as a label volume (convert/evaluate)."""
    d = path.parent
    return Setup({"tomogram": path, "src": path, "pred": path, "gt": good_table(d), **extra})


@case("truncated_mrc", ALL_TOMO, r"truncated")
def _truncated(d: Path) -> Setup:
    """MRC file cut in half (interrupted copy)."""
    p = good_tomogram(d, "truncated.mrc")
    p.write_bytes(p.read_bytes()[: 1024 + 20000])
    return _tomo_setup(p)


@case("header_size_mismatch", ALL_TOMO, r"header is wrong")
def _header_mismatch(d: Path) -> Setup:
    """Header NX says 64 columns, the data block holds 48."""
    p = good_tomogram(d, "header.mrc")
    patch_header(p, 0, 64)
    return _tomo_setup(p)


@case("unknown_mrc_mode", ALL_TOMO, r"unknown data mode 5")
def _unknown_mode(d: Path) -> Setup:
    """MRC mode 5 (not defined by MRC2014)."""
    p = good_tomogram(d, "mode5.mrc")
    patch_header(p, 12, 5)
    return _tomo_setup(p)


@case("garbage_bytes", ALL_TOMO, r"not a valid MRC file")
def _garbage(d: Path) -> Setup:
    """Random bytes in a file named .mrc."""
    p = d / "garbage.mrc"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return _tomo_setup(p)


@case("empty_file", ALL_TOMO, r"shorter than the 1024-byte header")
def _empty(d: Path) -> Setup:
    """A 0-byte .mrc file."""
    p = d / "empty.mrc"
    p.write_bytes(b"")
    return _tomo_setup(p)


@case("missing_file", ALL_TOMO, r"file not found")
def _missing(d: Path) -> Setup:
    """The tomogram path does not exist (typo)."""
    return _tomo_setup(d / "no_such_tomogram.mrc")


@case("unknown_suffix", READERS, r"unknown tomogram format '\.xyz'")
def _suffix(d: Path) -> Setup:
    """A tomogram with an unknown file suffix."""
    p = d / "tomo.xyz"
    p.write_bytes(b"\0" * 2048)
    return _tomo_setup(p)


@case("nan_inf_voxels", ALL_TOMO, r"NaN/Inf voxels; repair or crop",
      code_for={"info": 0}, expect_for={"info": r"problems:\s*- 3 NaN/Inf voxels",
                                          "convert": r"not a label volume", "evaluate": r"not a label volume"})
def _nan(d: Path) -> Setup:
    """Float volume with NaN and ±Inf voxels (info reports them)."""
    v = noise()
    v[3, 4, 5], v[10, 10, 10], v[20, 1, 2] = np.nan, np.inf, -np.inf
    return _tomo_setup(good_tomogram(d, "nan.mrc", v))


@case("constant_volume", "info predict segment", r"volume is constant \(every voxel is 3\).*reconstructed tomogram",
      code_for={"info": 0}, expect_for={"info": r"problems:\s+none"})
def _constant(d: Path) -> Setup:
    """Every voxel is 3.0."""
    return _tomo_setup(good_tomogram(d, "constant.mrc", np.full(SHAPE, 3.0, np.float32)))


@case("all_zero_volume", "predict segment batch", r"volume is constant \(every voxel is 0\)")
def _zeros(d: Path) -> Setup:
    """Every voxel is 0 (e.g. a failed reconstruction)."""
    return _tomo_setup(good_tomogram(d, "zeros.mrc", np.zeros(SHAPE, np.float32)))


@case("image_2d", "info predict segment convert", r"2-D .*must be 3-D", code_for={"info": 0})
def _image2d(d: Path) -> Setup:
    """A single 2-D image (one projection) instead of a volume."""
    return _tomo_setup(write_raw_mrc(d / "image.mrc", noise((48, 48))))


@case("stack_4d", "info predict segment convert", r"4-D .*must be 3-D", code_for={"info": 0})
def _stack4d(d: Path) -> Setup:
    """A 4-D stack (volume series)."""
    return _tomo_setup(write_raw_mrc(d / "stack.mrc", noise((2, 8, 16, 16))))


def _vs_case(d: Path, vs: Any) -> Setup:
    return _tomo_setup(good_tomogram(d, "vs.mrc", vs=vs))


@case("voxel_size_zero", READERS, r"voxel size 0 Å .* must be positive; give the true size with --voxel-size",
      code_for={"info": 0})
def _vs0(d: Path) -> Setup:
    """Header voxel size 0 Å."""
    return _vs_case(d, 0.0)


@case("voxel_size_negative", READERS, r"voxel size -5 Å .* must be positive", code_for={"info": 0})
def _vsneg(d: Path) -> Setup:
    """Header voxel size -5 Å."""
    return _vs_case(d, -5.0)


@case("voxel_size_unset_1A", READERS, r"1 Å .* unset MRC default", code_for={"info": 0})
def _vs1(d: Path) -> Setup:
    """Header voxel size 1.0 Å (the 'unset' default of many writers)."""
    return _vs_case(d, 1.0)


@case("voxel_size_nm_as_A", READERS, r"0\.0018 Å .* \(nm written as Å\?\)", code_for={"info": 0})
def _vsnm(d: Path) -> Setup:
    """Header voxel size 0.0018 (nm written where Å belong, and in µm)."""
    return _vs_case(d, 0.0018)


@case("voxel_size_10000A", READERS, r"10000 Å .* above 100", code_for={"info": 0})
def _vsbig(d: Path) -> Setup:
    """Header voxel size 10,000 Å."""
    return _vs_case(d, 10000.0)


@case("voxel_size_option_bad", "info predict segment batch", r"-3 Å in the --voxel-size option must be positive")
def _vsopt(d: Path) -> Setup:
    """A good file, but --voxel-size -3 on the command line."""
    return _tomo_setup(good_tomogram(d), voxel_size=-3.0)


@case("anisotropic_voxels", "info predict segment", r"anisotropic voxel size .* resample the tomogram",
      code_for={"info": 0, "predict": 0},
      expect_for={"info": r"anisotropic voxel size \(z, y, x\) = \(66", "predict": r"random on cpu"})
def _aniso(d: Path) -> Setup:
    """Voxel size (z, y, x) = (66, 22, 22) Å (predict resamples to the isotropic model grid)."""
    return _tomo_setup(good_tomogram(d, "aniso.mrc", noise((12, 48, 48)), vs=(66.0, 22.0, 22.0)))


@case("smaller_than_tile", "predict segment", r"random on cpu \((fp32|bf16)\), 1 tiles", code=0,
      expect_for={"segment": r"^0 vesicles"})
def _small(d: Path) -> Setup:
    """A 12×16×16 volume, far smaller than one network tile: predicted as one padded tile."""
    return _tomo_setup(good_tomogram(d, "small.mrc", noise((12, 16, 16))))


@case("too_small_for_network", "predict segment", r"model grid would be only \(2, 3, 3\) voxels")
def _tiny(d: Path) -> Setup:
    """A 2×3×3 volume: nothing the network can see."""
    return _tomo_setup(good_tomogram(d, "tiny.mrc", noise((2, 3, 3))))


@case("no_vesicles", "segment", r"^0 vesicles \(0 candidates rejected\)", code=0)
def _novesicles(d: Path) -> Setup:
    """A tomogram without vesicles (probability 0 everywhere): an empty table, not an error."""
    t = good_tomogram(d)
    prob = write_raw_mrc(d / "prob.mrc", np.zeros(SHAPE, np.float32))
    return Setup({"tomogram": t, "from_probability": prob})


@case("inverted_contrast", "predict", r"inverted=True", code=0)
def _inverted(d: Path) -> Setup:
    """Dense material bright (e.g. a phase-flipped export): detected and inverted."""
    return _tomo_setup(good_tomogram(d, "bright.mrc", shells(dark=False)))


@case("int8_narrow_range", "predict", r"random on cpu", code=0)
def _int8(d: Path) -> Setup:
    """int8 tomogram whose voxels are 0 except 0.4 % at ±1 (percentile clipping would flatten it)."""
    rng = np.random.default_rng(2)
    v = np.zeros(SHAPE, np.int8)
    idx = rng.random(SHAPE) < 0.004
    v[idx] = rng.choice(np.array([-1, 1], np.int8), int(idx.sum()))
    return _tomo_setup(good_tomogram(d, "int8.mrc", v))


@case("mask_wrong_shape", "segment convert evaluate", r"shape \(16, 24, 24\)")
def _maskshape(d: Path) -> Setup:
    """A region mask of another (binned) grid."""
    m = write_raw_mrc(d / "mask.mrc", np.ones((16, 24, 24), np.uint8))
    t = good_tomogram(d)
    return Setup({"tomogram": t, "mask": m, "src": good_table(d), "like": t, "cytoplasm": m, "to": "pyto",
                  "pred": good_table(d), "gt": good_table(d, "gt.csv"), "eval_mask": m,
                  "dst_name": "pyto.mrc"})


@case("mask_not_a_volume", "segment", r"mask\.mrc is not a readable mask volume")
def _maskgarbage(d: Path) -> Setup:
    """The mask file is not an MRC file."""
    m = d / "mask.mrc"
    m.write_bytes(b"this is not an MRC file" * 100)
    return Setup({"tomogram": good_tomogram(d), "mask": m})


@case("mod_empty", "segment convert evaluate", r"empty\.mod is empty, not an IMOD model")
def _modempty(d: Path) -> Setup:
    """A 0-byte .mod file."""
    m = d / "empty.mod"
    m.write_bytes(b"")
    return Setup({"tomogram": good_tomogram(d), "mask_model": m, "src": m, "pred": m, "gt": good_table(d)})


@case("mod_corrupt", "segment convert evaluate", r"corrupt\.mod is not a valid IMOD model")
def _modcorrupt(d: Path) -> Setup:
    """A .mod file with a valid magic but a garbled body."""
    m = d / "corrupt.mod"
    m.write_bytes(b"IMODV1.2" + bytes(range(200)))
    return Setup({"tomogram": good_tomogram(d), "mask_model": m, "src": m, "pred": m, "gt": good_table(d)})


@case("mod_outside_volume", "segment convert", r"lie outside the (volume|grid)")
def _modoutside(d: Path) -> Setup:
    """Contours / vesicles drawn on a 10× larger volume: none lies inside this one."""
    closed = imod_file(d, "outside.mod", "closed", [[500, 500, 50], [600, 500, 50], [600, 600, 50]], (320, 480, 480))
    far = good_table(d, "far.csv", centres=[[300.0, 400.0, 400.0]], radii=[5.0])
    t = good_tomogram(d)
    return Setup({"tomogram": t, "mask_model": closed, "src": far, "like": t, "dst_name": "labels.mrc"})


@case("radius_range_inverted", "segment batch", r"--radius-range 30 10 is not a range of radii; give 0 < MIN < MAX")
def _rrange(d: Path) -> Setup:
    """--radius-range with MIN above MAX."""
    return Setup({"tomogram": good_tomogram(d), "radius_range": "30 10"})


@case("radius_range_below_two_voxels", "segment", r"minimum 2 nm is under 2 voxels")
def _rrange_small(d: Path) -> Setup:
    """--radius-range whose minimum no fit can resolve at the voxel size."""
    return Setup({"tomogram": good_tomogram(d), "radius_range": "2 90"})


@case("probability_out_of_range", "segment", r"not a probability map \(values outside \[0, 1\]\)")
def _probrange(d: Path) -> Setup:
    """--from-probability given a tomogram instead of a probability map."""
    t = good_tomogram(d)
    return Setup({"tomogram": t, "from_probability": good_tomogram(d, "not_prob.mrc")})


@case("probability_wrong_shape", "segment", r"probability map .* has shape \(16, 24, 24\)")
def _probshape(d: Path) -> Setup:
    """--from-probability from a binned run."""
    t = good_tomogram(d)
    return Setup({"tomogram": t, "from_probability": write_raw_mrc(d / "p.mrc", np.zeros((16, 24, 24), np.float32))})


@case("model_file_corrupt", "predict segment batch", r"no metadata file|not a valid|cannot read")
def _modelbad(d: Path) -> Setup:
    """--model points at a corrupt weight file."""
    m = d / "broken.safetensors"
    m.write_bytes(b"\x00garbage" * 64)
    return _tomo_setup(good_tomogram(d), model=m)


@case("table_without_voxel_size", "convert evaluate", r"cannot tell the voxel size .* --voxel-size")
def _tablevs(d: Path) -> Setup:
    """A CSV with coordinates but no nm columns and no --voxel-size."""
    p = d / "plain.csv"
    p.write_text("id,z,y,x,radius\n1,10,20,20,4\n")
    return Setup({"src": p, "pred": p, "gt": good_table(d)})


@case("table_bad_values", "convert evaluate", r"bad\.csv: vesicle table has radius <= 0; fix or drop those rows")
def _tablebad(d: Path) -> Setup:
    """A vesicle CSV with a negative radius."""
    p = good_table(d, "bad.csv")
    p.write_text(p.read_text().replace(",4.0000,22.0000,44.0000,44.0000,8.8000", ",-4.0000,22.0000,44.0000,44.0000,-8.8000"))
    return Setup({"src": p, "pred": p, "gt": good_table(d)})


@case("star_garbage", "convert evaluate", r"garbage\.star (is not a readable STAR file|has no data block)")
def _stargarbage(d: Path) -> Setup:
    """A .star file of random bytes."""
    p = d / "garbage.star"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8).tobytes())
    return Setup({"src": p, "pred": p, "gt": good_table(d)})


def _readonly_patch(ro: Path) -> Callable[[str], contextlib.AbstractContextManager]:
    """Refuse writes under ``ro`` like a read-only folder would (root ignores chmod)."""

    @contextlib.contextmanager
    def patched(command: str) -> Iterator[None]:
        os.chmod(ro, 0o555)
        real_mkdir, real_open = os.mkdir, os.open
        root = str(ro)

        def deny(path) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(root + os.sep)

        def mkdir(path, *a, **k):
            if deny(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real_mkdir(path, *a, **k)

        def open_(path, flags, *a, **k):
            if deny(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real_open(path, flags, *a, **k)

        os.mkdir, os.open = mkdir, open_
        try:
            yield
        finally:
            os.mkdir, os.open = real_mkdir, real_open
            os.chmod(ro, 0o755)

    return patched


@case("output_folder_unwritable", "segment predict convert evaluate batch", r"permission denied; choose a writable --output")
def _readonly(d: Path) -> Setup:
    """--output inside a read-only folder."""
    ro = d.parent / "readonly"
    ro.mkdir(exist_ok=True)
    s = _tomo_setup(good_tomogram(d), src=good_table(d), pred=good_table(d), gt=good_table(d, "gt.csv"),
                    out_root=ro, dst_name="v.star")
    s.patch = _readonly_patch(ro)
    return s


@case("output_under_a_file", "segment predict convert evaluate batch", r"a file is in the way where a folder is needed; choose another --output")
def _underfile(d: Path) -> Setup:
    """--output whose parent is a regular file."""
    blocker = d.parent / "out" / "blocker.txt"
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("x")
    return _tomo_setup(good_tomogram(d), src=good_table(d), pred=good_table(d), gt=good_table(d, "gt.csv"),
                       out_root=blocker, dst_name="v.star")


def _disk_full_patch(after: dict[str, int]) -> Callable[[str], contextlib.AbstractContextManager]:
    """Every atomic write after the first ``after[command]`` (default 0) fails with ENOSPC at its flush."""

    @contextlib.contextmanager
    def patched(command: str) -> Iterator[None]:
        import cryoves.atomic as atomic

        real = atomic._fsync
        calls = {"n": 0}

        def fsync(path):
            calls["n"] += 1
            if calls["n"] > after.get(command, 0):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path)

        atomic._fsync = fsync
        try:
            yield
        finally:
            atomic._fsync = real

    return patched


@case("disk_full", "segment predict convert evaluate", r"disk full while writing .*; free space or choose another --output")
def _diskfull(d: Path) -> Setup:
    """The disk fills up while the outputs are written (at the 3rd file of segment and evaluate)."""
    t = good_tomogram(d)
    prob = write_raw_mrc(d / "prob.mrc", np.zeros(SHAPE, np.float32))
    s = Setup({"tomogram": t, "from_probability": prob, "src": good_table(d), "pred": good_table(d),
               "gt": good_table(d, "gt.csv"), "dst_name": "v.star"})
    s.patch = _disk_full_patch({"segment": 2, "evaluate": 2})
    return s


@case("output_exists", "segment predict convert evaluate", r"(already holds .*|exists); pass --force")
def _exists(d: Path) -> Setup:
    """--output already holds a result and --force is not given (the old result is kept)."""
    out = d.parent / "out"
    (out / "seg").mkdir(parents=True, exist_ok=True)
    (out / "seg" / "manifest.json").write_text('{"outputs": {}}')
    (out / "seg" / "vesicles.csv").write_text("old result")
    (out / "prob.mrc").write_bytes(b"old probability")
    (out / "v.star").write_text("old table")
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "evaluation.json").write_text("{}")
    return _tomo_setup(good_tomogram(d), src=good_table(d), pred=good_table(d), gt=good_table(d, "gt.csv"),
                       dst_name="v.star")


@case("output_is_a_file", "segment", r"exists and is not a folder")
def _outfile(d: Path) -> Setup:
    """--output names an existing file where a folder is expected."""
    out = d.parent / "out"
    out.mkdir(exist_ok=True)
    (out / "seg").write_text("a file")
    return _tomo_setup(good_tomogram(d))


# ------------------------------------------------------------------------------------ running
@dataclass
class Outcome:
    code: int
    message: str
    """The error line without 'error: ' (failures) or the last stdout line (successes)."""
    stdout: str
    stderr: str


def outputs(files: dict[str, Any], tmp: Path) -> dict[str, Path]:
    root = Path(files.get("out_root", tmp / "out"))
    return {"segment": root / "seg", "predict": root / "prob.mrc", "convert": root / files.get("dst_name", "v.csv"),
            "evaluate": root / "eval", "batch": root / "batch"}


def _radius_range_args(f: dict[str, str]) -> list[str]:
    return ["--radius-range", *f["radius_range"].split()] if "radius_range" in f else []


def cli_args(command: str, files: dict[str, Any], tmp: Path, model: Path) -> list[str]:
    out = outputs(files, tmp).get(command)
    f = {k: str(v) for k, v in files.items()}
    vs = ["--voxel-size", f["voxel_size"]] if "voxel_size" in f else []
    mdl = ["--model", f.get("model", str(model))]
    if command == "info":
        return ["info", f["tomogram"], *vs]
    if command == "predict":
        return ["predict", f["tomogram"], "-o", str(out), *mdl, *vs]
    if command == "segment":
        opt = [x for k in ("mask", "mask_model", "from_probability") if k in f
               for x in (f"--{k.replace('_', '-')}", f[k])]
        return ["segment", f["tomogram"], "-o", str(out), *mdl, *vs, *opt, *_radius_range_args(f)]
    if command == "batch":
        return ["batch", f["tomogram"], "-o", str(out), *mdl, *vs, "--workers", "1", *_radius_range_args(f)]
    if command == "convert":
        opt = [x for k in ("like", "cytoplasm", "to") if k in f for x in (f"--{k}", f[k])]
        return ["convert", f["src"], str(out), *opt]
    if command == "evaluate":
        opt = ["--mask", f["eval_mask"], "--like", f.get("like", f.get("tomogram", ""))] if "eval_mask" in f else []
        return ["evaluate", f["pred"], f["gt"], "-o", str(out), *opt]
    raise ValueError(command)


def run_cli(command: str, setup: Setup, tmp: Path, model: Path) -> Outcome:
    """Run one command in-process through the typer app (batch on an in-process Dask cluster)."""
    from typer.testing import CliRunner

    from cryoves.cli import app

    args = cli_args(command, setup.files, tmp, model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_keep_logging())
        if command == "batch":
            stack.enter_context(_threaded_batch_client())
        if setup.patch is not None:
            stack.enter_context(setup.patch(command))
        res = CliRunner().invoke(app, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "internal error:"))]
    if errors:
        msg = errors[-1].split(":", 1)[1].strip() if res.exit_code else errors[-1]
    else:
        lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
        msg = lines[-1].strip() if lines else ""
    if command == "batch" and res.exit_code == 2:
        msg = _batch_error(outputs(setup.files, tmp)["batch"]) or msg
    if command == "info" and res.exit_code == 0:
        msg = res.stdout[res.stdout.find("problems:"):].strip()
    return Outcome(res.exit_code, msg, res.stdout, res.stderr)


@contextlib.contextmanager
def _keep_logging() -> Iterator[None]:
    """The CLI points logging at CliRunner's stderr; restore the handlers once that stream is closed."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _batch_error(root: Path) -> str | None:
    import pandas as pd

    p = root / BATCH_SUMMARY
    if not p.exists():
        return None
    errs = pd.read_csv(p)["error"].dropna()
    return str(errs.iloc[0]) if len(errs) else None


@contextlib.contextmanager
def _threaded_batch_client() -> Iterator[None]:
    """Make ``cryoves batch`` use a one-thread in-process Dask cluster (seconds, not tens of seconds)."""
    import cryoves.cluster as cluster

    real = cluster.make_client

    def make_client(n_items, **kwargs):
        from distributed import Client, LocalCluster

        return Client(LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"))

    cluster.make_client = make_client
    try:
        yield
    finally:
        cluster.make_client = real


def run_api(command: str, setup: Setup, tmp: Path, model: Path) -> Any:
    """The same call through the Python API; returns its result (raises the library's error)."""
    f = setup.files
    out = outputs(f, tmp).get(command)
    vs = f.get("voxel_size")
    mdl = str(f.get("model", model))
    with setup.patch(command) if setup.patch is not None else contextlib.nullcontext():
        if command == "info":
            from cryoves.io import tomogram_info

            return tomogram_info(f["tomogram"], voxel_size=vs)
        if command == "predict":
            from cryoves.predict import predict_file

            return predict_file(f["tomogram"], out, voxel_size=vs, model=mdl, progress=False)
        if command in ("segment", "batch"):
            from cryoves.pipeline import SegmentConfig, segment

            rr = tuple(float(v) for v in str(f["radius_range"]).split()) if "radius_range" in f else None
            cfg = SegmentConfig(model=mdl, voxel_size=vs, report=False, radius_range_nm=rr,
                                **{k: str(f[k]) for k in ("mask", "mask_model", "from_probability") if k in f})
            if command == "segment":
                return segment(f["tomogram"], out, cfg)
            from distributed import Client, LocalCluster

            from cryoves.batch import run_batch

            with Client(LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                     dashboard_address=":0")) as client:
                return run_batch([str(f["tomogram"])], out, cfg, client=client, progress=False)
        if command == "convert":
            from cryoves.io.tables import convert_vesicles

            return convert_vesicles(f["src"], out, like=f.get("like"), cytoplasm=f.get("cytoplasm"), to=f.get("to"))
        if command == "evaluate":
            from cryoves.evaluate import evaluate_files, write_evaluation

            mask = f.get("eval_mask")
            res = evaluate_files(f["pred"], f["gt"], mask=mask, like=f.get("like", f.get("tomogram")) if mask else None)
            return write_evaluation(res, out)
    raise ValueError(command)


def matches(pattern: str, message: str) -> bool:
    return re.search(pattern, message, flags=re.IGNORECASE | re.MULTILINE) is not None


def all_runs() -> list[tuple[Case, str]]:
    return [(c, cmd) for c in CASES for cmd in c.commands]


# ------------------------------------------------------------------------------------ fuzz targets
# Each target takes raw bytes and feeds them to one of our parsers (and what consumes its output).
# A typed CryovesError is the expected answer to garbage; anything else escaping is a bug.
FUZZ_SHAPE = (6, 10, 12)
MRC_INT32_FIELDS = {"nx": 0, "ny": 1, "nz": 2, "mode": 3, "nxstart": 4, "mx": 7, "my": 8, "mz": 9,
                    "mapc": 16, "mapr": 17, "maps": 18, "ispg": 22, "nsymbt": 23, "nversion": 27, "nlabl": 55}
MRC_FLOAT32_FIELDS = {"cella_x": 10, "cella_y": 11, "cella_z": 12, "dmin": 19, "dmax": 20, "dmean": 21,
                      "origin_x": 49, "origin_y": 50, "origin_z": 51, "rms": 54}
MRC_BYTES_FIELDS = {"exttyp": 104, "map": 208, "machst": 212, "imod_stamp": 152, "imod_flags": 156}


def valid_mrc_bytes(dtype: Any = np.float32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    path = _scratch_dir() / "seed.mrc"
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data((rng.normal(size=FUZZ_SHAPE) * 20).astype(dtype))
        m.voxel_size = 22.0
    return path.read_bytes()


def _scratch_dir() -> Path:
    import tempfile

    d = Path(tempfile.gettempdir()) / f"cryoves-fuzz-{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d


def _typed_or_raise(fn: Callable[[], Any]) -> Any:
    from cryoves.errors import CryovesError

    try:
        return fn()
    except CryovesError:
        return None


def fuzz_mrc(data: bytes) -> None:
    """Bytes as an .mrc file → read_mrc (validated and not) and tomogram_info; touch the data."""
    from cryoves.io import read_mrc, tomogram_info

    path = _scratch_dir() / "fuzz.mrc"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns on odd headers; we only care about crashes
        tomo = _typed_or_raise(lambda: read_mrc(path, validate=False, mmap=False))
        if tomo is not None:
            np.asarray(tomo.data).sum()
            tomo.header_notes  # noqa: B018
        t2 = _typed_or_raise(lambda: read_mrc(path))
        if t2 is not None:
            assert t2.data.ndim == 3 and all(np.isfinite(t2.voxel_size))
        _typed_or_raise(lambda: tomogram_info(path))


def fuzz_mod(data: bytes) -> None:
    """Bytes → parse_mod → vesicles, closed and open masks on a small grid."""
    from cryoves.io.imod import mod_to_vesicles, parse_mod, rasterize_closed, rasterize_open

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. overflowing casts of coordinates
        model = _typed_or_raise(lambda: parse_mod(data))
        if model is None:
            return
        _typed_or_raise(lambda: mod_to_vesicles(model, voxel_size=22.0))
        _typed_or_raise(lambda: mod_to_vesicles(model))
        for fn in (rasterize_closed, rasterize_open):
            mask = _typed_or_raise(lambda fn=fn: fn(model, FUZZ_SHAPE))
            assert mask is None or mask.shape == FUZZ_SHAPE


def fuzz_table(data: bytes) -> None:
    """Bytes as a .csv and as a .star vesicle table → read_vesicles (header voxel size and given)."""
    from cryoves.io.tables import read_vesicles

    for suffix in (".csv", ".star"):
        path = _scratch_dir() / f"fuzz{suffix}"
        path.write_bytes(data)
        for vs in (None, 22.0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = _typed_or_raise(lambda path=path, vs=vs: read_vesicles(path, voxel_size=vs))
            if table is not None:
                assert np.isfinite(table.centres).all() and (table.radii > 0).all()
                assert table.voxel_size > 0


FUZZ_TARGETS: dict[str, Callable[[bytes], None]] = {"mrc": fuzz_mrc, "mod": fuzz_mod, "table": fuzz_table}
