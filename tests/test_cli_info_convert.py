"""`cryoves info`, `cryoves convert`, help texts, and the error contract (one line, exit code 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoves.cli import app
from cryoves.io import write_mrc
from cryoves.io.tiff import write_tiff
from cryoves.vesicles import VesicleTable

SHAPE = (20, 24, 28)


def _run(*args):
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def files(tmp_path):
    data = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    tomo = write_mrc(tmp_path / "tomo.mrc", data, 14.0)
    t = VesicleTable.from_spheres([[6.2, 7.5, 8.1], [13.0, 16.0, 19.5]], [3.5, 4.2], 14.0, ids=[4, 8])
    csv = t.write_csv(tmp_path / "v.csv")
    return tmp_path, tomo, csv, t, data


def test_help_texts_complete():
    res = _run("--help")
    assert res.exit_code == 0 and "info" in res.output and "convert" in res.output
    import typer.main

    group = typer.main.get_command(app)
    for name in group.commands:
        sub = _run(name, "--help")
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage" in sub.output


def test_info_text_and_json(files):
    tmp, tomo, *_rest, data = files
    res = _run("info", tomo)
    assert res.exit_code == 0, res.output
    assert "20 x 24 x 28" in res.output and "float32" in res.output and "problems:    none" in res.output
    res = _run("info", tomo, "--json")
    info = json.loads(res.output)
    assert info["shape"] == list(SHAPE) and info["voxel_size_A"] == [14.0, 14.0, 14.0]
    assert info["max"] == pytest.approx(float(data.max()))
    assert info["bytes_float32"] == int(np.prod(SHAPE)) * 4


def test_info_reports_header_problems(tmp_path):
    p = write_mrc(tmp_path / "nm.mrc", np.ones((3, 4, 5), np.float32), 0.0018)
    res = _run("info", p)
    assert res.exit_code == 0
    assert "0.0018" in res.output and "--voxel-size" in res.output
    res = _run("info", p, "--voxel-size", "18")
    assert res.exit_code == 0 and "18, 18, 18 Å" in res.output
    assert "overridden" in res.output and "below" not in res.output


@pytest.mark.parametrize("kind", ["truncated", "missing", "nan", "2d", "vs0", "vs1", "vs_nm"])
def test_bad_inputs_exit_2_one_line_no_output(tmp_path, kind):
    p = tmp_path / "in.mrc"
    if kind == "truncated":
        write_mrc(p, np.ones((4, 5, 6), np.float32), 10.0)
        p.write_bytes(p.read_bytes()[:-50])
    elif kind == "nan":
        write_mrc(p, np.full((4, 5, 6), np.nan, np.float32), 10.0)
    elif kind == "2d":
        write_mrc(p, np.ones((1, 5, 6), np.float32), 10.0)
    elif kind.startswith("vs"):
        write_mrc(p, np.ones((4, 5, 6), np.uint16), {"vs0": 0.0, "vs1": 1.0, "vs_nm": 0.0018}[kind])
    out = tmp_path / "out.csv"
    res = _run("convert", p, out)
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg
    if kind.startswith("vs"):
        assert "--voxel-size" in msg
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ([] if kind == "missing" else ["in.mrc"])


def test_info_missing_file_exit_2(tmp_path):
    res = _run("info", tmp_path / "none.mrc")
    assert res.exit_code == 2 and "not found" in res.output


def test_convert_chain(files):
    tmp, tomo, csv, t, _ = files
    assert _run("convert", csv, tmp / "v.star").exit_code == 0
    res = _run("convert", tmp / "v.star", tmp / "l.mrc", "--like", tomo)
    assert res.exit_code == 0, res.output
    res = _run("convert", tmp / "l.mrc", tmp / "p.mrc", "--pyto")
    assert res.exit_code == 0, res.output
    assert (tmp / "p.ids.json").exists()
    res = _run("convert", tmp / "p.mrc", tmp / "back.csv")
    assert res.exit_code == 0, res.output
    back = VesicleTable.read_csv(tmp / "back.csv")
    assert sorted(back.ids.tolist()) == [4, 8]
    res = _run("convert", csv, tmp / "v.star")
    assert res.exit_code == 2 and "--force" in res.output
    assert _run("convert", csv, tmp / "v.star", "--force").exit_code == 0


def test_convert_shape_option_and_voxel_size_for_tiff(files):
    tmp, _tomo, csv, t, _ = files
    res = _run("convert", csv, tmp / "l.mrc", "--shape", *SHAPE)
    assert res.exit_code == 0, res.output
    # a TIFF label volume without metadata needs --voxel-size
    import tifffile

    tifffile.imwrite(tmp / "l.tif", t.to_labels(SHAPE, dtype=np.uint16), photometric="minisblack")
    res = _run("convert", tmp / "l.tif", tmp / "x.csv")
    assert res.exit_code == 2 and "--voxel-size" in res.output
    res = _run("convert", tmp / "l.tif", tmp / "x.csv", "--voxel-size", "14")
    assert res.exit_code == 0, res.output
    write_tiff(tmp / "m.tif", t.to_labels(SHAPE, dtype=np.uint16), 14.0)
    assert _run("convert", tmp / "m.tif", tmp / "y.csv").exit_code == 0


def test_debug_shows_traceback(tmp_path):
    res = _run("--debug", "info", tmp_path / "none.mrc")
    assert res.exit_code != 0 and res.exception is not None


def test_convert_mask_options_share_segments_names(files, caplog):
    import mrcfile

    tmp, tomo, csv, _, _ = files
    cyto = np.zeros(SHAPE, np.uint8)
    cyto[2:-2, 2:-2, 2:-2] = 1
    az = np.zeros(SHAPE, np.uint8)
    az[1, :, :] = 1
    write_mrc(tmp / "cyto.mrc", cyto, 14.0)
    write_mrc(tmp / "az.mrc", az, 14.0)
    res = _run("convert", csv, tmp / "p.mrc", "--pyto", "--like", tomo, "--mask", tmp / "cyto.mrc",
               "--az-mask", tmp / "az.mrc")
    assert res.exit_code == 0, res.output
    with mrcfile.open(tmp / "p.mrc") as m:
        assert {1, 2} <= set(np.unique(m.data).tolist())
    help_text = _run("convert", "--help").output
    assert "--az-mask" in help_text and "--cytoplasm" not in help_text and "--active-zone" not in help_text
    # the old names still work (hidden, deprecated)
    with caplog.at_level("WARNING", logger="cryoves"):
        res = _run("convert", csv, tmp / "old.mrc", "--pyto", "--like", tomo, "--cytoplasm", tmp / "cyto.mrc")
    assert res.exit_code == 0, res.output
    assert "--cytoplasm is deprecated" in caplog.text
