"""QC report: self-contained HTML with embedded figures, written by segment and by `cryoves report`."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from _sim_utils import small_sim, write_sim_inputs
from cryoves.cli import app
from cryoves.errors import InputError
from cryoves.pipeline import SegmentConfig, segment
from cryoves.report import make_report, radial_profile


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    sim = small_sim(1)
    d = write_sim_inputs(sim, tmp_path_factory.mktemp("rep"))
    sim.vesicles.write_csv(d / "gt.csv")
    out = d / "seg"
    segment(d / "tomo.mrc", out, SegmentConfig(from_probability=str(d / "prob.mrc"), az_mask=str(d / "az.mrc")))
    return d, out


def test_segment_writes_self_contained_report(seg_dir):
    _, out = seg_dir
    html = (out / "report.html").read_text()
    for png in ("slices", "gallery", "radius_histogram", "outliers"):
        assert (out / "report" / f"{png}.png").stat().st_size > 1000
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 4
    assert not re.search(r'(src|href)="(https?:)?//', html), "report must open offline"
    assert "Timings" in html and "Parameters" in html and "Rejected candidates" in html
    assert "Synapse analysis" in html  # an active-zone mask was given


def test_report_with_ground_truth_marks_misses(seg_dir):
    d, out = seg_dir
    r = CliRunner().invoke(app, ["report", str(out), "--ground-truth", str(d / "gt.csv")])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert "Evaluation against ground truth" in html and "f1_centre" in html


def test_report_refuses_folder_without_result(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        make_report(tmp_path)


def test_radial_profile_of_dark_shell_has_minimum_at_membrane():
    z, y, x = np.mgrid[:41, :41, :41]
    d = np.sqrt((z - 20.3) ** 2 + (y - 19.8) ** 2 + (x - 20.1) ** 2)
    vol = -np.exp(-((d - 10) ** 2) / 2)
    r, p = radial_profile(vol, np.array([20.3, 19.8, 20.1]), 16)
    assert abs(r[np.nanargmin(p)] - 10) <= 0.5


def test_radius_histogram_goes_log_for_several_populations(tmp_path):
    import pandas as pd

    from cryoves.report import plot_radius_histogram, radius_bins

    sv, large = np.full(50, 20.0) + np.arange(50) * 0.1, np.full(6, 65.0)
    edges, log = radius_bins(np.r_[sv, large])
    assert log and edges[0] < 20 and edges[-1] > 65 and np.allclose(np.diff(np.log(edges)), np.diff(np.log(edges))[0])
    assert not radius_bins(sv)[1]
    df = pd.DataFrame({"radius_nm": np.r_[sv, large], "detection_voxel_nm": [2.2] * 50 + [6.6] * 6})
    assert plot_radius_histogram(df, tmp_path / "h.png").stat().st_size > 1000


def test_report_uses_the_volume_given_and_negates_lazily(seg_dir, tmp_path):
    import shutil

    from cryoves.io import read_tomogram
    from cryoves.report import _Negated, plot_gallery

    d, out = seg_dir
    vol = read_tomogram(d / "tomo.mrc").asarray()
    copy = tmp_path / "seg"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    # the manifest names a tomogram that is gone: only the volume given can be used
    manifest = (copy / "manifest.json").read_text().replace(str(d / "tomo.mrc"), str(tmp_path / "gone.mrc"))
    (copy / "manifest.json").write_text(manifest)
    with pytest.raises(InputError, match="not found"):
        make_report(copy)
    assert make_report(copy, volume=vol).stat().st_size > 10_000
    neg = _Negated(vol)
    assert neg.shape == vol.shape and np.array_equal(neg[3, 2:9], -vol[3, 2:9])
    table = pd.read_csv(out / "vesicles.csv")
    plot_gallery(neg, table, tmp_path / "a.png")
    plot_gallery(-vol, table, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_the_gallery_drawn_by_a_worker_is_the_one_drawn_here(seg_dir, tmp_path, monkeypatch):
    import shutil

    from cryoves import parallel

    _, out = seg_dir
    handed = []
    real = parallel.submit
    monkeypatch.setattr(parallel, "submit", lambda fn, *a: handed.append(fn.__name__) or real(fn, *a))
    pngs = {}
    for n in (1, 2):
        copy = tmp_path / f"seg{n}"
        shutil.copytree(out, copy)
        parallel.set_workers(n)
        try:
            make_report(copy)
        finally:
            parallel.set_workers(None)
        pngs[n] = (copy / "report" / "gallery.png").read_bytes()
    assert handed == ["draw_gallery"] * 2  # with 2 workers a worker drew it, with 1 this process
    assert pngs[1] == pngs[2]
