"""The result folder (cryoves.results): open_result, is_complete_result for segment and reviewed folders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from _napari_utils import VOXEL_SIZE_A, fake_segment_output, phantom, truth_table
from _sim_utils import small_sim, write_sim_inputs
from cryoves.errors import InputError
from cryoves.napari._session import load_result
from cryoves.pipeline import SegmentConfig, segment
from cryoves.results import (
    MANIFEST_NAME,
    OUTPUT_FILES,
    is_complete_result,
    open_result,
    result_voxel_size,
)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    sim = small_sim(0)
    d = write_sim_inputs(sim, tmp_path_factory.mktemp("sim"))
    out = d / "seg"
    res = segment(d / "tomo.mrc", out, SegmentConfig(from_probability=str(d / "prob.mrc"), report=False))
    return sim, d, out, res


def test_open_result_reads_a_segment_folder(segmented):
    sim, d, out, res = segmented
    r = open_result(out)
    pd.testing.assert_frame_equal(r.vesicles.df, res.vesicles.df, check_exact=False, atol=1e-3)
    assert len(r.rejected) == len(res.rejected)
    assert r.voxel_size_a == 22.0 and r.shape == sim.tomogram.shape
    assert r.kind == "segment" and r.tomogram_path == d / "tomo.mrc"
    assert set(r.paths) >= {"vesicles", "star", "labels", "probability", "mod", "rejected"}
    assert r.file("labels") == out / OUTPUT_FILES["labels"]


def test_voxel_size_comes_from_the_manifest_else_the_mrc_header(segmented, tmp_path):
    *_, out, _ = segmented
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (OUTPUT_FILES["vesicles"], OUTPUT_FILES["labels"]):
        (copy / name).write_bytes((out / name).read_bytes())
    assert result_voxel_size(copy) == pytest.approx(22.0)  # no manifest: labels.mrc header
    r = open_result(copy)
    assert r.voxel_size_a == pytest.approx(22.0) and r.shape is not None and r.manifest == {}
    assert len(r.rejected) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["inputs"]["voxel_size_a"] = [30.0, 30.0, 30.0]
    assert result_voxel_size(out, manifest) == 30.0  # the manifest wins over the header


def test_open_result_refuses_a_folder_without_a_table(tmp_path):
    with pytest.raises(InputError, match="vesicles.csv"):
        open_result(tmp_path)


def test_a_reviewed_folder_is_a_complete_result(tmp_path):
    out = fake_segment_output(tmp_path / "auto", truth_table(), phantom())
    session, _ = load_result(out, recover=False, fitter=None)
    session.delete(3)
    written = session.save()
    target = written["manifest"].parent
    assert is_complete_result(target)
    r = open_result(target)
    assert r.kind == "review" and sorted(r.vesicles.ids) == [1, 2, 4]
    assert r.voxel_size_a == pytest.approx(VOXEL_SIZE_A) and r.shape == phantom().shape
    # a changed output is detected as in a segment folder
    labels = target / OUTPUT_FILES["labels"]
    labels.write_bytes(labels.read_bytes()[:-8])
    assert not is_complete_result(target)


def test_segment_result_checksums_cover_every_output(segmented):
    *_, out, _ = segmented
    assert is_complete_result(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "segment"
    assert set(manifest["outputs"]) == {OUTPUT_FILES[k] for k in ("vesicles", "star", "mod", "rejected",
                                                                   "probability", "labels")}
    assert np.isfinite(manifest["threshold"])


def test_evaluate_reads_a_result_folder(segmented):
    from cryoves.evaluate import read_evaluation_input

    *_, out, res = segmented
    table = read_evaluation_input(out)
    np.testing.assert_allclose(table.centres, res.vesicles.centres, atol=1e-3)


def test_rejected_ids_follow_the_vesicle_ids_and_survive_a_restore(segmented, tmp_path):
    from cryoves.io import write_mrc
    from cryoves.napari._session import EditSession
    from cryoves.vesicles import REJECTED_COLUMNS, RejectedTable

    sim, d, *_ = segmented
    half = np.zeros(sim.tomogram.shape, np.uint8)  # a region mask over half the volume: rejections
    half[:, :, : half.shape[2] // 2] = 1
    write_mrc(tmp_path / "half.mrc", half, sim.tomogram.voxel_size)
    out = tmp_path / "seg"
    res = segment(d / "tomo.mrc", out,
                  SegmentConfig(from_probability=str(d / "prob.mrc"), mask=str(tmp_path / "half.mrc"), report=False))
    r = open_result(out)
    assert isinstance(r.rejected, RejectedTable) and list(r.rejected.df.columns[:7]) == REJECTED_COLUMNS
    n, m = len(r.vesicles), len(r.rejected)
    assert m > 0, "the small simulation should give some rejected candidates"
    assert sorted(r.vesicles.ids) == list(range(1, n + 1))
    assert sorted(r.rejected.ids) == list(range(n + 1, n + m + 1))  # disjoint from the vesicle ids
    zyx = r.rejected.df[["z", "y", "x"]].dropna()
    assert zyx.equals(zyx.sort_values(["z", "y", "x"], kind="stable"))  # deterministic order
    # the table carries the grid of the tomogram it was made on
    assert r.vesicles.shape == sim.tomogram.shape == res.vesicles.shape
    assert r.vesicles.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(r.vesicles.to_labels(), res.labels)

    session = EditSession(r.vesicles, r.shape, rejected=r.rejected, fitter=None)
    rej = session.rejected
    k = int(np.flatnonzero(np.isfinite(rej[["z", "y", "x", "radius"]].to_numpy(float)).all(axis=1))[0])
    cid = int(rej.loc[k, "id"])
    assert session.restore(k) == cid and session.row(cid)["source"] == "restored"
    assert session.add((5, 5, 5), radius=3.0, fit=False) == n + m + 1  # above every candidate's id
    saved = open_result(next(iter(session.save(tmp_path / "rev").values())).parent)
    assert cid in set(saved.vesicles.ids) and not set(saved.vesicles.ids) & set(saved.rejected.ids)


def test_an_older_rejected_table_with_colliding_ids_is_renumbered_in_the_editor():
    from cryoves.napari._session import EditSession

    rej = pd.DataFrame({"id": [1, 1], "z": [5.0, 9.0], "y": [5.0, 9.0], "x": [5.0, 9.0], "radius": [3.0, 3.0],
                        "step": ["fit", "label"], "reason": ["a", "b"]})
    s = EditSession(truth_table(), phantom().shape, rejected=rej, fitter=None)
    top = int(truth_table().ids.max())
    assert list(s.rejected["id"]) == [top + 1, top + 2]
    assert s.restore(0) == top + 1


def test_an_older_rejected_table_with_duplicate_ids_still_opens(tmp_path):
    from cryoves.results import OUTPUT_FILES, open_result
    from cryoves.vesicles import VesicleTable

    table = VesicleTable.from_spheres([[5, 5, 5], [9, 9, 9]], [2.0, 2.0], 10.0)
    table.write_csv(tmp_path / OUTPUT_FILES["vesicles"])
    (tmp_path / OUTPUT_FILES["rejected"]).write_text(
        "id,z,y,x,radius,step,reason\n3,1,1,1,1,label,small\n3,2,2,2,1,fit,no membrane\n"
    )
    res = open_result(tmp_path)
    assert list(res.rejected.ids) == [3, 4] and list(res.rejected.df["step"]) == ["label", "fit"]


def test_a_checksum_started_in_the_background_is_used_once_and_only_for_the_unchanged_file(tmp_path, monkeypatch):
    """`segment` starts hashing its input before the heavy imports: the checksum step then waits
    for that result instead of reading the file again; a file changed since is hashed anew."""
    import hashlib

    from cryoves import checksum

    f = tmp_path / "tomo.bin"
    f.write_bytes(b"a" * 5_000_000)
    reads = []
    real = checksum._hash
    monkeypatch.setattr(checksum, "_hash", lambda p, c: reads.append(p) or real(p, c))
    checksum.hash_in_background(f)
    assert checksum.file_sha256(f) == hashlib.sha256(b"a" * 5_000_000).hexdigest()
    assert len(reads) == 1  # the background thread's read only
    assert checksum.file_sha256(f) == hashlib.sha256(b"a" * 5_000_000).hexdigest() and len(reads) == 2
    checksum.hash_in_background(f)
    f.write_bytes(b"b" * 5_000_001)  # changed after the start: the started result is not used
    assert checksum.file_sha256(f) == hashlib.sha256(b"b" * 5_000_001).hexdigest()
    checksum.hash_in_background(tmp_path)  # a folder (OME-Zarr): nothing started
    assert checksum.file_sha256(f) == hashlib.sha256(b"b" * 5_000_001).hexdigest()
