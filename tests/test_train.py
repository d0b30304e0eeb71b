"""Training: config, data, augmentation, loss, loop (loss falls, checkpoint loads, determinism,
resume, fine-tuning, real data with masks) and the ``cryoves train`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cryoves.cli import app
from cryoves.errors import OutputExistsError, ParameterError
from cryoves.model import load_model
from cryoves.train import TrainConfig, build_config, segmentation_loss, train
from cryoves.train.augment import augment_batch, gaussian_blur
from cryoves.train.config import AugmentConfig, TomogramSource
from cryoves.train.data import PatchSampler, TrainingVolume, load_tomogram_source, model_grid
from cryoves.train.loop import lr_at

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def _tiny(output: Path, cache: Path, **changes) -> TrainConfig:
    """A seconds-long run: 1-level U-Net with 4 filters, 24³ patches, the 'small' simulation preset."""
    d = dict(
        output=str(output), seed=0, num_threads=1, precision="fp32",
        architecture=dict(depth=1, base_filters=4),
        data=dict(simulated=dict(fraction=1.0, preset="small", pool_size=1, val_count=1, cache=str(cache))),
        optim=dict(steps=6, batch_size=2, patch_size=24, warmup_steps=2, lr=5e-3),
        augment=dict(p=0.5), val_every=1000, checkpoint_every=1000,
    )
    cfg = TrainConfig.from_dict(d)
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")


# ---------------------------------------------------------------------- the loop
def test_loss_falls_and_best_checkpoint_loads_back(tmp_path, cache):
    cfg = _tiny(tmp_path / "run", cache, **{"optim.steps": 40, "val_every": 40, "log_every": 10, "optim.lr": 0.03,
                                           "optim.foreground_fraction": 1.0, "augment.p": 0.0,
                                           "optim.bn_momentum": 0.3})
    res = train(cfg, progress=False)
    h = res.history
    assert list(h["step"]) == [10, 20, 30, 40]
    assert h["loss"].iloc[-1] < 0.92 * h["loss"].iloc[0]
    assert h["val_loss"].iloc[-1] < np.log(2)  # better than the uninformed p = 0.5
    assert res.best_checkpoint is not None and res.best_checkpoint.exists()
    loaded = load_model(res.best_checkpoint)
    meta = json.loads(res.best_checkpoint.with_suffix(".json").read_text())
    assert meta["voxel_size_a"] == 22.0 and meta["polarity"] == "dense_dark"
    assert meta["training"]["step"] == 40 and meta["training"]["data"]["simulated"]["pool_size"] == 1
    assert "version" in meta["training"]
    # the saved weights are the trained ones (same output as the resumable state)
    state = torch.load(res.last_checkpoint, weights_only=True)
    net2 = type(loaded.net)(**loaded.info.architecture)
    net2.load_state_dict(state["model"])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), net2.eval()(x))
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 1000
    assert (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_same_seed_same_run_other_seed_differs(tmp_path, cache):
    a = train(_tiny(tmp_path / "a", cache, **{"optim.steps": 3, "val_every": 3}), progress=False)
    b = train(_tiny(tmp_path / "b", cache, **{"optim.steps": 3, "val_every": 3}), progress=False)
    c = train(_tiny(tmp_path / "c", cache, **{"optim.steps": 3, "val_every": 3, "seed": 1}), progress=False)
    sa, sb, sc = (torch.load(r.last_checkpoint, weights_only=True)["model"] for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, cache):
    straight = train(_tiny(tmp_path / "s", cache, **{"optim.steps": 6, "checkpoint_every": 3}), progress=False)
    part = _tiny(tmp_path / "r", cache, **{"optim.steps": 6, "checkpoint_every": 3})
    train(part.replace(**{"optim.steps": 3}), progress=False)
    resumed = train(part, resume=True, progress=False)
    assert resumed.steps == 6
    s1 = torch.load(straight.last_checkpoint, weights_only=True)["model"]
    s2 = torch.load(resumed.last_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_existing_run_is_refused_without_force_and_time_limit_stops(tmp_path, cache):
    cfg = _tiny(tmp_path / "run", cache, **{"optim.steps": 1000, "time_limit_min": 1e-6})
    res = train(cfg, progress=False)
    assert res.steps == 1
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stopped_early"] is True
    with pytest.raises(OutputExistsError):
        train(cfg, progress=False)


def test_fine_tune_from_a_saved_model_keeps_its_input_settings(tmp_path, cache):
    from cryoves.model import ModelInfo, UNet3D, save_checkpoint

    start = tmp_path / "start.safetensors"
    save_checkpoint(start, UNet3D(depth=1, base_filters=4), ModelInfo(name="start", voxel_size_a=30.0, prefilter_sigma=0.5))
    tuned = train(_tiny(tmp_path / "b", cache, init=str(start), **{"optim.steps": 1}), progress=False)
    info = load_model(tuned.best_checkpoint).info
    assert info.voxel_size_a == 30.0 and info.prefilter_sigma == 0.5
    assert info.architecture["depth"] == 1 and info.name == "cryoves-custom"
    # our exact-ball targets set the threshold search, whatever the starting model used
    assert info.threshold_range == [0.3, 0.99, 0.01]


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE / "weights.h5").exists(), reason="CryoVesNet reference weights absent")
def test_fine_tune_the_imported_cryovesnet_weights(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("CRYOVES_CRYOVESNET_WEIGHTS", str(REFERENCE / "weights.h5"))
    cfg = _tiny(tmp_path / "ft", cache, init="cryovesnet", **{"optim.steps": 2, "optim.patch_size": 32})
    res = train(cfg, progress=False)
    info = load_model(res.best_checkpoint).info
    assert info.architecture["base_filters"] == 16 and info.prefilter_sigma == 1.0
    assert "GPL" in (info.licence or "")


# ---------------------------------------------------------------------- real data
def _write_real(tmp_path: Path, vs: float = 11.0):
    """A simulated tomogram written as a 'lab' would have it: MRC, vesicle CSV, region mask."""
    from cryoves.io import write_mrc
    from cryoves.simulate import SimulationConfig, simulate

    sim = simulate(SimulationConfig.preset("small", voxel_size_a=vs, shape=(48, 96, 96), n_vesicles=6), seed=3)
    write_mrc(tmp_path / "tomo.mrc", -sim.tomogram.asarray(), vs)  # stored dense = bright
    sim.vesicles.write_csv(tmp_path / "vesicles.csv")
    write_mrc(tmp_path / "labels.mrc", sim.labels.astype(np.uint16), vs)
    mask = np.zeros(sim.labels.shape, np.uint8)
    mask[:, :, : mask.shape[2] // 2] = 1
    write_mrc(tmp_path / "mask.mrc", mask, vs)
    return sim


def test_real_tomogram_with_table_labels_and_mask_goes_to_the_model_grid(tmp_path):
    sim = _write_real(tmp_path)
    grid = model_grid(voxel_size_a=22.0)
    from_table = load_tomogram_source(
        TomogramSource(tomogram=str(tmp_path / "tomo.mrc"), labels=str(tmp_path / "vesicles.csv"),
                       mask=str(tmp_path / "mask.mrc"), invert=True), grid)
    from_labels = load_tomogram_source(
        TomogramSource(tomogram=str(tmp_path / "tomo.mrc"), labels=str(tmp_path / "labels.mrc"), invert=True), grid)
    assert from_table.image.shape == (24, 48, 48)
    assert from_table.source_voxel_size_a == 11.0
    # table rendered on the new grid and labels resampled agree (same voxel-centre convention)
    a, b = from_table.target > 0, from_labels.target > 0
    assert (a & b).sum() / max(1, (a | b).sum()) > 0.8
    assert len(from_table.vesicles) == len(sim.vesicles)
    assert np.allclose(from_table.vesicles.radii, sim.vesicles.radii / 2)
    # the mask keeps the left half only; inverted input comes out dense = dark like the simulation
    assert from_table.weight[:, :, :20].all() and not from_table.weight[:, :, 28:].any()
    assert np.corrcoef(from_table.image.ravel(), from_labels.image.ravel())[0, 1] > 0.99
    shell = from_table.target.astype(bool)
    assert from_table.image[shell].mean() < from_table.image[~shell].mean() + 0.5


def test_training_on_real_data_only_with_a_region_mask(tmp_path, cache):
    _write_real(tmp_path)
    cfg = build_config(
        output=tmp_path / "run", tomograms=[str(tmp_path / "tomo.mrc")], labels=[str(tmp_path / "vesicles.csv")],
        masks=[str(tmp_path / "mask.mrc")], val_tomograms=[str(tmp_path / "tomo.mrc")],
        val_labels=[str(tmp_path / "labels.mrc")], invert=True, steps=2, patch_size=16, num_threads=1,
        **{"architecture.depth": 1, "architecture.base_filters": 4},
    )
    assert cfg.data.simulated.fraction == 0.0
    res = train(cfg, progress=False)
    assert res.steps == 2
    summary = json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]
    assert summary["real_train"][0]["name"] == "tomo.mrc" and summary["simulated"] is None


# ---------------------------------------------------------------------- pieces
def test_patch_sampler_oversamples_foreground_and_pads_small_volumes():
    rng = np.random.default_rng(0)
    target = np.zeros((20, 60, 60), np.uint8)
    target[5:12, 40:50, 40:50] = 1
    vol = TrainingVolume("v", rng.normal(size=target.shape).astype(np.float32), target, np.ones_like(target))
    fg = PatchSampler([vol], None, 0.0, 24, 1.0, np.random.default_rng(1)).sample(16)
    bg = PatchSampler([vol], None, 0.0, 24, 0.0, np.random.default_rng(1)).sample(16)
    assert fg[0].shape == (16, 1, 24, 24, 24)
    assert (fg[1].reshape(16, -1).max(1) > 0).all()
    assert fg[1].mean() > 2 * bg[1].mean()
    # z = 20 < 24: padded, with the padding ignored by the loss
    assert (fg[2][:, 0, 20:] == 0).all() and (fg[2][:, 0, :20] == 1).all()


def test_augmentations_move_labels_with_the_image_and_never_rotate_z():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 16, 16, 16)
    x[:, :, :, 3:6, 9:11] = 1.0  # a rod along z
    cfg = AugmentConfig(p=1.0, intensity=0.0, gamma_range=(1.0, 1.0), noise_sd=0.0, blur_sigma=0.0,
                        scale_range=(0.9, 1.1))
    img, tgt, w = augment_batch(x, x.clone(), torch.ones_like(x), cfg, g)
    assert torch.equal((img > 0.5).float(), tgt)
    for i in range(8):
        on = tgt[i, 0] > 0
        zs, ys, xs = (on.any(dim=d) for d in ((1, 2), (0, 2), (0, 1)))
        assert zs.sum() >= 14 and ys.sum() <= 5 and xs.sum() <= 5  # still a rod along z
    assert (w == 1).all()
    # intensity augmentations change the image only
    cfg2 = AugmentConfig(flip=False, rot90=False, p=1.0, scale_range=(1.0, 1.0))
    img2, tgt2, _ = augment_batch(x, x.clone(), torch.ones_like(x), cfg2, g)
    assert torch.equal(tgt2, x) and not torch.equal(img2, x)


def test_gaussian_blur_keeps_the_mean_and_smooths():
    x = torch.zeros(1, 1, 21, 21, 21)
    x[0, 0, 10, 10, 10] = 1.0
    y = gaussian_blur(x, 1.5)
    assert y.sum().item() == pytest.approx(1.0, rel=1e-4)
    assert y.max().item() < 0.05 and y[0, 0, 10, 10, 10] == y.max()


def test_loss_ignores_voxels_outside_the_weight_mask():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8, 8)
    target = (torch.rand(1, 1, 8, 8, 8) > 0.5).float()
    weight = torch.zeros_like(target)
    weight[..., :4] = 1
    base = segmentation_loss(logits, target, weight)
    changed = logits.clone()
    changed[..., 4:] += 5.0
    assert segmentation_loss(changed, target, weight) == pytest.approx(base.item())
    changed[..., :4] += 5.0
    assert segmentation_loss(changed, target, weight).item() != pytest.approx(base.item())
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert segmentation_loss(perfect, target, torch.ones_like(target)).item() < 1e-3


def test_learning_rate_warms_up_then_decays_with_steps_or_time():
    cfg = TrainConfig().replace(**{"data.simulated.fraction": 1.0, "optim.steps": 100, "optim.warmup_steps": 10, "optim.lr": 1.0,
                                   "optim.final_lr_fraction": 0.0})
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(100, cfg) == pytest.approx(0.0)
    assert lr_at(20, cfg, time_fraction=1.0) == pytest.approx(0.0)


# ---------------------------------------------------------------------- config and CLI
def test_yaml_config_paths_are_relative_to_the_file_and_typos_are_refused(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "output: run\ndata:\n  train:\n    - {tomogram: t.mrc, labels: l.csv}\n  simulated: {fraction: 0.5}\n"
        "optim: {steps: 7}\n"
    )
    cfg = TrainConfig.from_yaml(tmp_path / "r.yaml")
    assert cfg.output == str(tmp_path / "run") and cfg.optim.steps == 7
    assert cfg.data.train[0].tomogram == str(tmp_path / "t.mrc")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "bad.yaml").write_text("optim: {stpes: 7}\n")
    with pytest.raises(ParameterError, match="stpes"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ParameterError, match="patch_size"):
        TrainConfig().replace(**{"optim.patch_size": 30})
    with pytest.raises(ParameterError, match="one --labels per --tomogram"):
        build_config(output=tmp_path, tomograms=["a.mrc"], labels=[])


def test_default_recipe_is_a_valid_config():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "cryoves-default.yaml"
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.name == "cryoves-default" and cfg.data.simulated.fraction == 1.0
    assert cfg.export.endswith(os.path.join("src", "cryoves", "model", "weights", "cryoves-default"))


def test_cli_train_from_flags_and_from_yaml(tmp_path, cache):
    runner = CliRunner()
    flags = ["train", "-o", str(tmp_path / "flags"), "--steps", "1", "--patch-size", "16", "--batch-size", "1",
             "--sim-pool", "1", "--sim-val", "1", "--sim-preset", "small", "--sim-cache", str(cache),
             "--device", "cpu", "--precision", "fp32", "--seed", "3", "--name", "flagged"]
    r = runner.invoke(app, flags)
    assert r.exit_code == 0, r.output
    assert "trained 1 steps" in r.output
    assert load_model(tmp_path / "flags" / "checkpoints" / "best.safetensors").info.name == "flagged"
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(_tiny(tmp_path / "yaml", cache).to_yaml())
    r = runner.invoke(app, ["train", str(yaml_path), "--steps", "1"])
    assert r.exit_code == 0, r.output
    hist = pd.read_csv(tmp_path / "yaml" / "history.csv")
    assert hist["step"].iloc[-1] == 1
    r = runner.invoke(app, ["train", str(yaml_path), "--steps", "2"])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["train", "--steps", "2"])
    assert r.exit_code == 2 and "--output" in r.output


def test_validation_f1_compares_tables_on_the_same_grid():
    """Regression: a size-hint rescaled GT table (voxel size ≠ model voxel size) must still match."""
    from cryoves.train.loop import validate
    from cryoves.vesicles import VesicleTable

    shape = (32, 64, 64)
    gt = VesicleTable.from_spheres([[16, 20, 20], [16, 44, 44], [16, 20, 46]], [8, 8, 8], voxel_size=45.0)
    target = (gt.to_labels(shape) > 0).astype(np.uint8)
    image = np.where(target > 0, -1.0, 1.0).astype(np.float32)
    vol = TrainingVolume("hint", image, target, np.ones(shape, np.uint8), vesicles=gt)

    class Oracle(torch.nn.Module):  # a "network" that returns the ground truth
        divisor = 4

        def forward_logits(self, x):
            t = torch.from_numpy(target).float()[None, None]
            return (t - 0.5) * 40

    m = validate(Oracle(), [vol], torch.device("cpu"), False, model_voxel_size_a=22.0)
    assert m["f1"] == 1.0 and m["dice"] == 1.0


def test_thread_count_follows_the_machine_load(monkeypatch):
    from cryoves.train.loop import adapt_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
        assert adapt_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
        assert adapt_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
