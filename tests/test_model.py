"""U-Net architecture, Keras import (parity with the original), checkpoints and the registry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from _predict_utils import PARITY_NPZ, WEIGHTS_H5, random_net, write_keras_h5
from cryoves.errors import ModelError, ParameterError
from cryoves.model import (
    CRYOVESNET,
    ENV_CACHE,
    ENV_CRYOVESNET_WEIGHTS,
    ENV_OFFLINE,
    ModelInfo,
    UNet3D,
    fused_inference_copy,
    load_model,
    registry,
    save_checkpoint,
)
from cryoves.postprocess.threshold import threshold_grid

needs_weights = pytest.mark.skipif(not WEIGHTS_H5.exists(), reason="shared reference weights.h5 absent")


def _run(net: UNet3D, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(x)[None, None])[0, 0].numpy()


def test_default_architecture_is_the_original():
    net = UNet3D()
    convs = [tuple(b.conv.weight.shape[:2]) for b in net.conv_blocks()]
    # (out, in) of the 10 3×3×3 convolutions of spec §2.1, concatenation included
    assert convs == [(16, 1), (16, 16), (32, 16), (32, 32), (64, 32), (32, 64), (32, 64), (16, 32),
                     (16, 32), (16, 16)]
    assert tuple(net.head.weight.shape) == (1, 16, 1, 1, 1)
    assert net.n_parameters() == 250_641
    assert all(b.bn.eps == pytest.approx(1e-3) for b in net.conv_blocks())


def test_configurable_depth_and_width():
    net = UNet3D(depth=3, base_filters=8, convs_per_level=3, batch_norm=False)
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.inference_mode():
        p = net(x)
    assert p.shape == x.shape and float(p.min()) >= 0 and float(p.max()) <= 1
    assert net.divisor == 8 and all(b.bn is None for b in net.conv_blocks())


def test_forward_is_sigmoid_of_logits():
    net = random_net(1)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(net(x), torch.sigmoid(net.forward_logits(x)))


def test_fused_copy_and_cropped_forward_match_the_plain_network():
    net = random_net(2)
    x = torch.randn(2, 1, 32, 40, 48)
    fused = fused_inference_copy(net)
    crop = ((4, 8), (12, 0), (3, 5))
    with torch.inference_mode():
        full = net.forward_logits(x)
        assert torch.allclose(fused.forward_logits(x), full, atol=1e-4)
        cropped = fused.forward_logits(x, crop)
    assert torch.allclose(cropped, full[:, :, 4:24, 12:40, 3:43], atol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_inference_network_fuses_conv_relu_with_the_same_numbers(depth, dtype):
    """prepare_network fuses each convolution with its ReLU and the decoder fills its joined
    [up-sampled, skip] input in place; the logits are those of the plain folded network, bit for
    bit, for odd crops (odd region starts at every level) and batches."""
    from cryoves.model.unet import _ConvReLU
    from cryoves.predict import prepare_network

    net = random_net(4, depth=depth)
    cl = torch.channels_last_3d
    plain = fused_inference_copy(net).to(memory_format=cl).to(dtype)
    fast = prepare_network(net, torch.device("cpu"), "bf16" if dtype == torch.bfloat16 else "fp32")
    assert all(isinstance(b.conv, _ConvReLU) and isinstance(b[2], torch.nn.Identity) for b in fast.conv_blocks())
    x = torch.randn(2, 1, 40, 48, 56).to(dtype).contiguous(memory_format=cl)
    with torch.inference_mode():
        for crop in [None, ((3, 5), (4, 9), (1, 0)), ((13, 7), (0, 0), (6, 11))]:
            a, b = plain.forward_logits(x, crop), fast.forward_logits(x, crop)
            assert a.shape == b.shape and torch.equal(a, b), crop
        full = plain.forward_logits(x).float()
        cropped = fast.forward_logits(x, ((13, 7), (0, 0), (6, 11))).float()
    assert torch.allclose(cropped, full[:, :, 13:33, :, 6:45], atol=0.05 if dtype == torch.bfloat16 else 1e-4)


def test_conv_relu_fusion_falls_back_to_the_plain_network(monkeypatch):
    """A torch build whose fused call fails keeps convolution and ReLU apart (same results)."""
    from cryoves.model import unet
    from cryoves.predict import prepare_network

    def broken(self, x):
        raise RuntimeError("no fused kernel here")

    monkeypatch.setattr(unet._ConvReLU, "forward", broken)
    net = random_net(5)
    fast = prepare_network(net, torch.device("cpu"), "fp32")
    assert all(type(b.conv) is torch.nn.Conv3d and isinstance(b[2], torch.nn.ReLU) for b in fast.conv_blocks())
    x = torch.randn(1, 1, 16, 24, 16).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        assert torch.allclose(fast.forward_logits(x), net.forward_logits(x), atol=1e-4)


@pytest.mark.parametrize("rename", [False, True], ids=["by-name", "by-order"])
def test_keras_import_roundtrip(tmp_path, rename):
    net = random_net(3)
    path = tmp_path / "w.h5"
    write_keras_h5(net, path, rename=rename)
    loaded = load_model(path)
    assert loaded.info.name == "w" and loaded.info.sha256 is not None
    x = np.random.default_rng(0).normal(size=(16, 24, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(loaded.net, x), _run(net, x), atol=1e-6)


def test_keras_import_rejects_other_files(tmp_path):
    import h5py

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ModelError, match="layer_names"):
        load_model(path)


@needs_weights
@pytest.mark.skipif(not PARITY_NPZ.exists(), reason="parity vectors absent")
@pytest.mark.parametrize("size", [64, 96])
def test_parity_with_original_keras_model(size, monkeypatch):
    monkeypatch.setenv(ENV_CRYOVESNET_WEIGHTS, str(WEIGHTS_H5))
    loaded = load_model("cryovesnet")
    assert loaded.info.sha256 == CRYOVESNET.sha256 and loaded.info.voxel_size_a == 22.0
    ref = np.load(PARITY_NPZ)
    p = _run(loaded.net, ref[f"input_{size}"])
    assert np.abs(p - ref[f"prob_{size}"]).max() <= 1e-4


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_roundtrip(tmp_path, suffix):
    net = random_net(4, base_filters=8)
    info = ModelInfo(name="mine", voxel_size_a=14.0, normalisation="zscore", vesicle_radius_nm=25.0)
    path = save_checkpoint(tmp_path / f"mine{suffix}", net, info)
    loaded = load_model(path)
    assert loaded.info.voxel_size_a == 14.0 and loaded.info.architecture["base_filters"] == 8
    if suffix == ".safetensors":
        assert loaded.info.sha256 == registry.sha256_file(path)
    x = np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(loaded.net, x), _run(net, x))


def test_threshold_range_is_stored_and_read_without_loading_weights(tmp_path):
    info = ModelInfo(name="mine", threshold_range=[0.4, 0.9, 0.1])
    path = save_checkpoint(tmp_path / "mine.safetensors", random_net(4), info)
    assert load_model(path).info.threshold_range == [0.4, 0.9, 0.1]
    path.write_bytes(b"not weights")  # model_info reads the JSON only
    np.testing.assert_allclose(registry.model_info(path).threshold_grid(), [0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    with pytest.raises(ModelError):
        load_model(path)
    h5 = tmp_path / "other.h5"
    h5.write_bytes(b"")
    assert registry.model_info(h5).name == "other"
    grid = registry.model_info("cryovesnet").threshold_grid()  # the original 0.80, 0.81, ..., 0.99
    assert len(grid) == 20 and grid[0] == 0.8 and grid[-1] == 0.99
    for bad in [(0.9, 0.5, 0.01), (0.5, 1.0, 0.1), (0.1, 0.5, 0), "0.5"]:
        with pytest.raises(ParameterError, match="threshold range"):
            threshold_grid(bad)


def test_safetensors_without_metadata_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", random_net(5), ModelInfo(name="m"))
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="metadata"):
        load_model(path)


def test_packaged_default_model_appears_when_dropped_in(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "PACKAGED_DIR", tmp_path)
    with pytest.raises(ModelError, match="cryoves-default"):
        load_model("cryoves-default")
    assert "cryoves-default" not in registry.available_models()
    save_checkpoint(tmp_path / "cryoves-default.safetensors", random_net(6), ModelInfo(name="cryoves-default"))
    assert load_model("cryoves-default").info.name == "cryoves-default"
    assert "cryoves-default" in registry.available_models()


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")


def test_cryovesnet_env_var_must_point_to_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CRYOVESNET_WEIGHTS, str(tmp_path / "missing.h5"))
    with pytest.raises(ModelError, match=ENV_CRYOVESNET_WEIGHTS):
        load_model("cryovesnet")


def test_cryovesnet_offline_without_cache_names_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CRYOVESNET_WEIGHTS, raising=False)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    monkeypatch.setenv(ENV_OFFLINE, "1")
    with pytest.raises(ModelError, match=ENV_CRYOVESNET_WEIGHTS):
        load_model("cryovesnet")


def test_cryovesnet_download_failure_is_a_model_error(tmp_path, monkeypatch):
    import pooch

    def fail(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv(ENV_CRYOVESNET_WEIGHTS, raising=False)
    monkeypatch.delenv(ENV_OFFLINE, raising=False)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(pooch, "retrieve", fail)
    with pytest.raises(ModelError, match="cannot download"):
        load_model("cryovesnet")


@needs_weights
def test_cryovesnet_found_in_cache_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CRYOVESNET_WEIGHTS, raising=False)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    monkeypatch.setenv(ENV_OFFLINE, "1")
    cached = tmp_path / "cryovesnet-weights.h5"
    shutil.copy(WEIGHTS_H5, cached)
    assert registry.fetch_cryovesnet_weights() == cached
    cached.write_bytes(b"corrupt")  # wrong sha256 → not used
    with pytest.raises(ModelError, match=ENV_OFFLINE):
        registry.fetch_cryovesnet_weights()
