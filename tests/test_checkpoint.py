"""Checkpoints: save/load round trips, diffusers directories, and one clear error for every broken input."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_checkpoint, load_config,
                                 load_metadata, save_checkpoint)
from fastdiff.testing import assert_close
from fastdiff.unet import UNet, UNetConfig


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**fields) -> UNetConfig:
    base = dict(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1, image_size=8, norm_num_groups=4,
                attention_head_dim=4)
    return UNetConfig.classic(**{**base, **fields})


def random_model(config: UNetConfig | None = None, seed: int = 0) -> UNet:
    model = UNet(config or tiny_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p[0].numel(), 1)))
    return model.eval()


def inputs(config: UNetConfig, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, config.in_channels, 8, 8, generator=gen), torch.tensor([3, 700])


def expect_error(path, match, **kwargs):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, **kwargs)
    assert "\n" not in str(info.value), "errors must be one line"
    return info.value


# ---------------------------------------------------------------------------------------------- round trips
def test_save_load_round_trip(tmp_path):
    model = random_model()
    out = save_checkpoint(model, tmp_path / "ckpt", extra_metadata={"scheduler": {"num_train_timesteps": 1000},
                                                                    "trained_steps": 4000})
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left behind
    raw = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert raw["fastdiff_unet"] == 1 and raw["scheduler"] == {"num_train_timesteps": 1000}
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    assert load_config(tmp_path / "ckpt") == model.config
    assert load_metadata(tmp_path / "ckpt") == {"scheduler": {"num_train_timesteps": 1000}, "trained_steps": 4000}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, t = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_dtypes(tmp_path):
    model = random_model()
    save_checkpoint(model.to(torch.bfloat16), tmp_path)
    assert load_checkpoint(tmp_path).dtype == torch.bfloat16
    as64 = load_checkpoint(tmp_path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in as64.parameters())


def test_overwrite_and_failed_save_keep_a_valid_checkpoint(tmp_path, monkeypatch):
    first, second = random_model(seed=0), random_model(tiny_config(n_blocks=2), seed=1)
    save_checkpoint(first, tmp_path)
    save_checkpoint(second, tmp_path)
    assert load_checkpoint(tmp_path).config == second.config

    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(first, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert load_checkpoint(tmp_path).config == second.config  # the old checkpoint is intact


def test_bad_extra_metadata(tmp_path):
    with pytest.raises(ValueError, match="reserved keys"):
        save_checkpoint(random_model(), tmp_path, extra_metadata={"config": {}})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(random_model(), tmp_path, extra_metadata={"when": object()})
    assert os.listdir(tmp_path) == []


def test_loads_a_diffusers_directory(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    ref = UNet2DModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1,
                      sample_size=8, attention_head_dim=4).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = load_checkpoint(tmp_path)
    assert load_config(tmp_path) == model.config and load_metadata(tmp_path) == {}
    x, t = inputs(model.config)
    with torch.no_grad():
        assert_close(model(x, t), ref(x, t).sample, torch.float32, what="diffusers directory via load_checkpoint")
    save_checkpoint(model, tmp_path / "ours")
    with pytest.raises(CheckpointError, match="is a fastdiff checkpoint, not a diffusers UNet2DModel"):
        UNet.from_diffusers(str(tmp_path / "ours"))


def test_never_unpickles(tmp_path, monkeypatch):
    save_checkpoint(random_model(), tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    model = random_model()
    save_checkpoint(model, tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def write_config(path, document):
    (path / CONFIG_NAME).write_text(document if isinstance(document, str) else json.dumps(document))


def test_error_path_missing(tmp_path):
    expect_error(tmp_path / "nothing", "checkpoint path does not exist")


def test_error_path_is_a_file(saved):
    path, _ = saved
    expect_error(path / WEIGHTS_NAME, "is not a directory")


def test_error_config_missing(saved):
    path, _ = saved
    os.remove(path / CONFIG_NAME)
    expect_error(path, "config.json is missing")
    os.makedirs(path / "unet")
    expect_error(path, "pass its unet/ folder")


@pytest.mark.parametrize("document, match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"fastdiff_unet": 2, "config": {}}, "format version 2 is not supported"),
    ({"fastdiff_unet": 1}, "the \"config\" entry is missing"),
    ({"fastdiff_unet": 1, "config": {"norm_num_groups": 3}}, "invalid config: UNetConfig.norm_num_groups=3 does not divide"),
    ({"fastdiff_unet": 1, "config": {"n_heads": 3}}, r"invalid config: unknown UNetConfig fields: \['n_heads'\]"),
    ({"fastdiff_unet": 1, "config": {"layers_per_block": "two"}}, "layers_per_block must be a positive int"),
    ({"config": {}}, "neither a fastdiff checkpoint"),
    ({"_class_name": "AutoencoderKL"}, "fastdiff loads UNet2DModel only"),
    ({"_class_name": "UNet2DModel", "down_block_types": ["CrossAttnDownBlock2D"] * 4},
     "unsupported diffusers config: unsupported diffusers down block type 'CrossAttnDownBlock2D'"),
])
def test_error_config_invalid(saved, document, match):
    path, _ = saved
    write_config(path, document)
    expect_error(path, match)
    with pytest.raises(CheckpointError, match=match):
        load_config(path)


def test_error_weights_missing(saved):
    path, _ = saved
    os.remove(path / WEIGHTS_NAME)
    expect_error(path, "weights file is missing: .*model.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_error_weights_corrupt(saved, damage):
    path, _ = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    damaged = {"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage]
    (path / WEIGHTS_NAME).write_bytes(damaged)
    expect_error(path, "corrupt or unreadable safetensors file")


def test_error_missing_and_unexpected_keys(saved):
    path, _ = saved
    state = load_file(path / WEIGHTS_NAME)
    del state["conv_out.bias"], state["down_blocks.1.attentions.0.to_q.weight"]
    state["extra.weight"] = torch.randn(3)
    save_file(state, path / WEIGHTS_NAME)
    err = expect_error(path, "weights do not match the config")
    assert "2 missing keys: conv_out.bias, down_blocks.1.attentions.0.to_q.weight" in str(err)
    assert "1 unexpected keys: extra.weight" in str(err)


def test_error_config_describes_another_network(saved):
    path, _ = saved
    write_config(path, {"fastdiff_unet": 1, "config": tiny_config(n_blocks=2).to_dict()})
    err = expect_error(path, "missing keys: down_blocks.0.resnets.1.conv1.bias")
    assert "... (+" in str(err)  # long lists are cut


def test_error_shape_mismatch(saved):
    path, _ = saved
    state = load_file(path / WEIGHTS_NAME)
    state["conv_in.weight"] = torch.randn(8, 3, 5, 5)
    save_file(state, path / WEIGHTS_NAME)
    expect_error(path, r"1 shape mismatches: conv_in.weight is \(8, 3, 5, 5\) in the weights, \(8, 3, 3, 3\) in the config")


def test_error_integer_tensor(saved):
    path, _ = saved
    state = load_file(path / WEIGHTS_NAME)
    state["conv_in.bias"] = torch.arange(8)
    save_file(state, path / WEIGHTS_NAME)
    expect_error(path, "non floating-point tensors: conv_in.bias")


def test_error_diffusers_pickle_only(tmp_path):
    write_config(tmp_path, {"_class_name": "UNet2DModel", "block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                            "up_block_types": ["UpBlock2D"]})
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    expect_error(tmp_path, "fastdiff refuses pickle files")
    with pytest.raises(CheckpointError, match="refuses pickle"):
        UNet.from_diffusers(str(tmp_path))
    os.remove(tmp_path / "diffusion_pytorch_model.bin")
    expect_error(tmp_path, "weights file is missing: .*diffusion_pytorch_model.safetensors")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
