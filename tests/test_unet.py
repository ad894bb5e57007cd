"""The UNet against diffusers' UNet2DModel: random configs, random weights, every timestep form.

Config structures come from fixed seeds (so coverage is stable and failures reproducible); weights and
inputs are fresh every run (seed printed on failure; set FASTDIFF_TEST_SEED to replay one).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random

import pytest
import torch

from fastdiff.diffusers_compat import DIFFUSERS_DEFAULTS, config_from_diffusers, to_diffusers_model
from fastdiff.shapes import flops_per_image, format_shapes, trace_shapes
from fastdiff.testing import assert_close
from fastdiff.unet import GroupNorm, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402

RUN_SEED = int(os.environ.get("FASTDIFF_TEST_SEED", random.SystemRandom().randrange(2**31)))
N_CONFIGS = 12


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(RUN_SEED + offset)


def random_diffusers_config(i: int) -> tuple[dict, tuple[int, int]]:
    """A small random UNet2DModel config (seeded by i) and an input size that divides by 2 ** (levels - 1)."""
    rng = random.Random(1000 + i)
    levels = rng.randint(1, 4)
    groups = rng.choice([1, 2, 4, 8, 32] if levels <= 2 else [1, 2, 4, 8])
    base = {1: rng.choice([3, 4, 5]), 2: 4, 4: 8, 8: 8, 32: 32}[groups]
    mults = [rng.choice([1, 2, 3]) if groups < 32 else rng.choice([1, 2]) for _ in range(levels)]
    chans = [base * m for m in mults]
    attn = [rng.random() < 0.5 for _ in range(levels)]
    up_attn = list(attn)
    if rng.random() < 0.25:  # diffusers allows the up path to differ from the down path
        j = rng.randrange(levels)
        up_attn[j] = not up_attn[j]
    mid_block = rng.random() < 0.85
    mid_attention = rng.random() < 0.7
    attended = [c for c, a, u in zip(chans, attn, up_attn) if a or u] + ([chans[-1]] if mid_block and mid_attention else [])
    head_dim = None
    if attended and rng.random() < 0.6:
        g = math.gcd(*attended)
        head_dim = rng.choice([d for d in range(1, g + 1) if g % d == 0])
    freq_shift = rng.choice([0, 1])
    if chans[0] // 2 == freq_shift:
        freq_shift = 0
    f = 2 ** (levels - 1)
    h = f * rng.choice([1, 3, 5] if levels <= 3 else [1, 3])
    w = h if rng.random() < 0.7 else f * rng.choice([1, 3])
    config = dict(
        sample_size=[h, w] if h != w else h,
        in_channels=rng.randint(1, 4),
        out_channels=rng.randint(1, 4),
        block_out_channels=chans,
        layers_per_block=rng.randint(1, 3),
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(up_attn)],
        mid_block_type="UNetMidBlock2D" if mid_block else None,
        add_attention=mid_attention,
        norm_num_groups=groups,
        attn_norm_num_groups=rng.choice([None, 1]) if mid_block and mid_attention else None,
        norm_eps=rng.choice([1e-5, 1e-6]),
        attention_head_dim=head_dim,
        flip_sin_to_cos=rng.random() < 0.5,
        freq_shift=freq_shift,
        downsample_padding=rng.choice([0, 1]),
        center_input_sample=rng.random() < 0.2,
        time_embedding_dim=rng.choice([None, None, 24]),
        mid_block_scale_factor=rng.choice([1, 1, math.sqrt(2)]),
        dropout=rng.choice([0.0, 0.1]),
    )
    return config, (h, w)


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Fresh random weights: convs and linears drawn like their default init, norm weights 1 +- 0.5, norm and
    other biases random too, q/k doubled so attention is far from uniform (logits of std ~2).

    Sharper or larger weights make the random network chaotic: it then amplifies float32 rounding (different
    but equally valid summation orders in GroupNorm and convolution kernels) past 1e-5.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                bound = 1.0 / math.sqrt(p[0].numel())  # nn.Linear / nn.Conv2d default: U(-1/sqrt(fan_in), ..)
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            if ".to_q." in name or ".to_k." in name:
                p.mul_(2.0)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads only spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timestep_forms(batch: int, gen: torch.Generator):
    ints = torch.randint(0, 1000, (batch,), generator=gen)
    return {
        "python int": int(ints[0]),
        "python float (integral)": float(ints[1 % batch]),
        "0-dim long tensor": ints[0].clone(),
        "[1] long tensor": ints[:1].clone(),
        "[N] long tensor": ints,
        "[N] fractional float tensor": torch.rand(batch, generator=gen) * 999.0,
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{i: (config dict, (h, w), diffusers model, fastdiff from instance, fastdiff from directory)}."""
    out = {}
    for i in range(N_CONFIGS):
        config, hw = random_diffusers_config(i)
        ref = randomize_(UNet2DModel(**config), _gen(i)).eval()
        directory = tmp_path_factory.mktemp(f"diffusers{i}")
        ref.save_pretrained(directory, safe_serialization=True)
        out[i] = (config, hw, ref, UNet.from_diffusers(ref), UNet.from_diffusers(str(directory)))
    return out


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_matches_diffusers(models, i):
    config, (h, w), ref, from_instance, from_directory = models[i]
    assert not from_instance.training and not from_directory.training
    ref_state = ref.state_dict()
    assert {k: tuple(v.shape) for k, v in from_instance.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref_state.items()}
    batch = 2
    gen = _gen(100 + i)
    x = torch.randn(batch, config["in_channels"], h, w, generator=gen)
    for label, t in timestep_forms(batch, gen).items():
        with torch.no_grad():
            expected = ref(x, t).sample
            for name, model in (("from instance", from_instance), ("from directory", from_directory)):
                got = model(x, t)
                assert_close(got, expected, torch.float32,
                             what=f"config {i} {config}, {name}, t {label}, seed {RUN_SEED}")


def test_round_trip_to_diffusers(models):
    for i in (0, 5, 7):
        config, (h, w), _, _, _ = models[i]
        ours = randomize_(UNet(config_from_diffusers(config)), _gen(200 + i)).eval()
        rebuilt = UNet2DModel.from_config(ours.config.to_diffusers_config())
        rebuilt.load_state_dict(ours.to_diffusers_state_dict(), strict=True)
        copied = to_diffusers_model(ours)
        x = torch.randn(3, config["in_channels"], h, w, generator=_gen(300 + i))
        t = torch.tensor([0, 499, 999])
        with torch.no_grad():
            expected = ours(x, t)
            for label, d in (("load_state_dict", rebuilt.eval()), ("to_diffusers_model", copied)):
                assert_close(d(x, t).sample, expected, torch.float32, what=f"config {i} via {label}, seed {RUN_SEED}")


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_config_round_trips(i):
    config, _ = random_diffusers_config(i)
    cfg = config_from_diffusers(config)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_from_diffusers(json.loads(json.dumps(cfg.to_diffusers_config()))) == cfg
    built = UNet2DModel.from_config(cfg.to_diffusers_config())
    assert {k for k in built.config if not k.startswith("_")} >= set(config)
    for key, value in config.items():
        got = built.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_diffusers_defaults_match_the_installed_diffusers():
    params = inspect.signature(UNet2DModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    assert defaults == DIFFUSERS_DEFAULTS
    cfg = UNetConfig.from_diffusers_config({"_class_name": "UNet2DModel"})  # everything from the defaults
    with torch.device("meta"):
        n_ref = sum(p.numel() for p in UNet2DModel().parameters())
        assert UNet(cfg).num_parameters() == n_ref


def test_deprecated_attention_key_names(tmp_path):
    """Old checkpoints name the attention projections query/key/value/proj_attn."""
    from safetensors.torch import save_file

    config, (h, w) = random_diffusers_config(0)
    config = {**config, "down_block_types": ["AttnDownBlock2D"] * len(config["block_out_channels"]),
              "up_block_types": ["AttnUpBlock2D"] * len(config["block_out_channels"])}
    ref = randomize_(UNet2DModel(**config), _gen(400)).eval()
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in ref.state_dict().items():
        for new, name in old.items():
            k = k.replace(f".{new}.", f".{name}.")
        state[k] = v.contiguous()
    assert any(".proj_attn." in k for k in state)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
    model = UNet.from_diffusers(str(tmp_path))
    x = torch.randn(2, config["in_channels"], h, w, generator=_gen(401))
    with torch.no_grad():
        assert_close(model(x, 17), ref(x, 17).sample, torch.float32, what=f"seed {RUN_SEED}")


def test_head_dim_not_dividing_the_channels():
    """diffusers then uses floor(C / d) heads of d channels (inner width < C); fastdiff does the same."""
    config = dict(block_out_channels=[12, 12], down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "AttnUpBlock2D"], norm_num_groups=4, attention_head_dim=5,
                  layers_per_block=1, sample_size=8)
    ref = randomize_(UNet2DModel(**config), _gen(500)).eval()
    model = UNet.from_diffusers(ref)
    assert model.down_blocks[0].attentions[0].to_q.weight.shape == (10, 12)
    x = torch.randn(2, 3, 8, 8, generator=_gen(501))
    with torch.no_grad():
        assert_close(model(x, 3), ref(x, 3).sample, torch.float32, what=f"seed {RUN_SEED}")


def test_resnet_downsample_type_without_attention_blocks_is_plain_conv():
    """diffusers passes downsample_type/upsample_type only to attention blocks; elsewhere it has no effect."""
    config = dict(block_out_channels=[8, 16], down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                  norm_num_groups=4, layers_per_block=1, downsample_type="resnet", upsample_type="resnet")
    ref = randomize_(UNet2DModel(**config), _gen(600)).eval()
    model = UNet.from_diffusers(ref)
    x = torch.randn(1, 3, 8, 8, generator=_gen(601))
    with torch.no_grad():
        assert_close(model(x, 5), ref(x, 5).sample, torch.float32, what=f"seed {RUN_SEED}")


# ---------------------------------------------------------------------------------------------- configs
def test_default_config_is_ddpm_cifar10():
    cfg = UNetConfig()
    with torch.device("meta"):
        assert UNet(cfg).num_parameters() == 35_746_307
        assert sum(p.numel() for p in UNet2DModel(**cfg.to_diffusers_config()).parameters()) == 35_746_307


def test_classic_channels_are_not_compounded():
    cfg = UNetConfig.classic(n_channels=32, ch_mults=(1, 2, 2, 4), is_attn=(False, False, True, True))
    assert cfg.block_out_channels == (32, 64, 64, 128)
    assert cfg.attention_levels == (False, False, True, True)
    assert UNetConfig.classic().block_out_channels == (64, 128, 128, 256)
    with torch.device("meta"):
        model = UNet(cfg)
    for i, m in enumerate((1, 2, 2, 4)):
        assert model.down_blocks[i].resnets[-1].conv2.out_channels == 32 * m
        assert model.up_blocks[3 - i].resnets[-1].conv2.out_channels == 32 * m
        assert (model.down_blocks[i].attentions is not None) == (i >= 2)
    over = UNetConfig.classic(n_channels=16, ch_mults=(1, 3), is_attn=(True, False), n_blocks=1, image_channels=1,
                              image_size=8, norm_num_groups=8, dropout=0.1)
    assert (over.block_out_channels, over.layers_per_block, over.in_channels, over.out_channels, over.sample_size,
            over.norm_num_groups, over.dropout) == ((16, 48), 1, 1, 1, 8, 8, 0.1)
    with pytest.raises(ValueError, match="unknown fields"):
        UNetConfig.classic(n_groups=4)


@pytest.mark.parametrize("fields, message", [
    (dict(block_out_channels=(8, 12), attention_levels=(False, True), norm_num_groups=8),
     "norm_num_groups=8 does not divide 12 channels"),
    (dict(block_out_channels=(), attention_levels=()), "block_out_channels must be a non-empty tuple"),
    (dict(attention_levels=(False, True)), "attention_levels has 2 entries for 4 levels"),
    (dict(up_attention_levels=(True,)), "up_attention_levels has 1 entries for 4 levels"),
    (dict(layers_per_block=0), "layers_per_block must be a positive int"),
    (dict(in_channels=2.0), "in_channels must be a positive int"),
    (dict(attention_head_dim=512), "attention_head_dim=512 exceeds the 256 channels"),
    (dict(block_out_channels=(2,), attention_levels=(False,), norm_num_groups=1, freq_shift=1, sample_size=8),
     "different from freq_shift"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift='scale_shift' is not supported"),
    (dict(sample_size=36), "sample_size=36 is not a multiple of 8"),
    (dict(sample_size=(32, 0)), "sample_size must be a positive int"),
    (dict(mid_attention=1), "mid_attention must be a bool"),
    (dict(attention_levels=(0, 1, 0, 0)), "attention_levels must be a tuple of bools"),
    (dict(attn_norm_num_groups=3), "attn_norm_num_groups=3 does not divide the middle block's 256 channels"),
    (dict(norm_eps=0.0), "norm_eps must be a positive number"),
    (dict(mid_block_scale_factor=0), "mid_block_scale_factor must be a non-zero number"),
    (dict(downsample_padding=-1), "downsample_padding must be an int >= 0"),
])
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**fields)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown UNetConfig fields: \['n_heads'\]"):
        UNetConfig.from_dict({**UNetConfig().to_dict(), "n_heads": 4})


@pytest.mark.parametrize("changes, message", [
    (dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]), "unsupported diffusers down block type 'CrossAttnDownBlock2D'"),
    (dict(up_block_types=["SkipUpBlock2D", "UpBlock2D"]), "unsupported diffusers up block type 'SkipUpBlock2D'"),
    (dict(time_embedding_type="fourier"), "unsupported time_embedding_type 'fourier'"),
    (dict(class_embed_type="timestep"), "class-conditional"),
    (dict(num_class_embeds=10), "class-conditional"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift='scale_shift' is not supported"),
    (dict(act_fn="gelu"), "unsupported act_fn 'gelu'"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "unsupported mid_block_type 'UNetMidBlock2DCrossAttn'"),
    (dict(up_block_types=["UpBlock2D"]), "2 down blocks, 1 up blocks and 2 block_out_channels"),
    (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"], downsample_type="resnet"), "unsupported downsample_type 'resnet'"),
    (dict(_class_name="UNet2DConditionModel"), "fastdiff converts only UNet2DModel"),
])
def test_unsupported_diffusers_configs(changes, message):
    base = dict(block_out_channels=[8, 16], down_block_types=["DownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=4)
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers_config({**base, **changes})


def test_unknown_diffusers_keys_warn():
    with pytest.warns(UserWarning, match="image_resolution"):
        UNetConfig.from_diffusers_config({"block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                                          "up_block_types": ["UpBlock2D"], "image_resolution": 3})


# ---------------------------------------------------------------------------------------------- forward
def _tiny(**fields) -> UNet:
    cfg = dataclasses.replace(UNetConfig.classic(n_channels=8, ch_mults=(1, 2, 2), is_attn=(False, True, True),
                                                 n_blocks=1, image_size=12, norm_num_groups=4, attention_head_dim=4),
                              **fields)
    return randomize_(UNet(cfg), _gen(700)).eval()


def test_input_errors():
    model = _tiny()
    x = torch.randn(2, 3, 12, 12, generator=_gen(701))
    with pytest.raises(ValueError, match="input has 4 channels, the model expects 3"):
        model(torch.randn(2, 4, 12, 12), 1)
    with pytest.raises(ValueError, match="input size 12x10 is not a multiple of 4"):
        model(torch.randn(2, 3, 12, 10), 1)
    with pytest.raises(ValueError, match=r"must be \[batch, 3, height, width\]"):
        model(torch.randn(3, 12, 12), 1)
    with pytest.raises(ValueError, match=r"must be 0-dim, \[1\] or \[batch=2\], got shape \(3,\)"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="got shape"):
        model(x, torch.ones(2, 1))
    with pytest.raises(TypeError, match="timestep must be an int, a float or a tensor"):
        model(x, "10")
    with pytest.raises(TypeError, match="timestep tensor must be integer or floating point"):
        model(x, torch.tensor(True))


def test_timestep_forms_agree():
    model = _tiny()
    x = torch.randn(2, 3, 12, 12, generator=_gen(702))
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7]))
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7.0, 7.0], dtype=torch.float64)):
            assert torch.equal(model(x, t), ref), t
        frac = model(x, 12.75)  # a Python float keeps its fraction (diffusers would truncate it to 12)
        assert torch.equal(frac, model(x, torch.tensor([12.75, 12.75])))
        assert not torch.equal(frac, model(x, 12))
        per_sample = model(x, torch.tensor([3, 900]))
        # another batch size may pick other conv kernels: equal to rounding, not bitwise
        assert_close(per_sample[1], model(x[1:], 900)[0], torch.float32, what="sample 1 alone")


def test_channels_last_input():
    model = _tiny()
    x = torch.randn(2, 3, 12, 12, generator=_gen(703))
    with torch.no_grad():
        ref = model(x, 5)
        out = model(x.contiguous(memory_format=torch.channels_last), 5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, torch.float32, what=f"channels_last, seed {RUN_SEED}")


def test_set_backend():
    model = _tiny()
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    attns = [m for m in model.modules() if hasattr(m, "attention_backend") and m is not model]
    assert len(norms) == 30 and len(attns) == 7  # attention: 1 + 1 down, 1 mid, 2 + 2 up
    assert all(m.backend is None for m in norms) and all(m.attention_backend is None for m in attns)
    x = torch.randn(2, 3, 12, 12, generator=_gen(704))
    with torch.no_grad():
        model.set_backend("reference")
        assert all(m.backend == "reference" for m in norms) and all(m.attention_backend == "reference" for m in attns)
        ref = model(x, 9)
        model.set_backend("auto")
        assert all(m.backend == "auto" for m in norms) and all(m.attention_backend == "auto" for m in attns)
        model.set_backend("auto", attention="sdpa")
        assert all(m.attention_backend == "sdpa" for m in attns)
        assert_close(model(x, 9), ref, torch.float32, what=f"auto/sdpa vs reference, seed {RUN_SEED}")
        model.set_backend(None)
        assert all(m.backend is None for m in norms) and all(m.attention_backend is None for m in attns)
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        model.set_backend("cuda")


def test_bfloat16_forward_runs():
    model = _tiny().to(torch.bfloat16)
    x = torch.randn(2, 3, 12, 12, generator=_gen(705))
    with torch.no_grad():
        out = model(x.to(torch.bfloat16), 3)
        ref = _tiny()(x, 3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out.float(), ref, torch.float32, rtol=5e-2, what="bfloat16 model vs float32 (loose: whole network)")


# ---------------------------------------------------------------------------------------------- shapes
def test_trace_shapes_classic_512():
    cfg = UNetConfig.classic(n_channels=128, ch_mults=(1, 2, 4), is_attn=(False, False, True), image_size=512)
    rows = dict(trace_shapes(cfg, batch_size=2))
    assert rows["time_embedding"] == (2, 512)
    assert rows["conv_in"] == (2, 128, 512, 512)
    assert rows["down_blocks.0.downsamplers.0"] == (2, 128, 256, 256)
    assert rows["down_blocks.1.resnets.1"] == (2, 256, 256, 256)
    assert rows["down_blocks.2.attentions.1"] == (2, 512, 128, 128)
    assert rows["mid_block.attentions.0"] == (2, 512, 128, 128)
    assert rows["up_blocks.0.upsamplers.0"] == (2, 512, 256, 256)
    assert rows["up_blocks.2.resnets.2"] == (2, 128, 512, 512)
    assert rows["conv_out"] == (2, 3, 512, 512)
    text = format_shapes(trace_shapes(cfg), cfg)
    assert "mid_block.resnets.1" in text and "(1, 512, 128, 128)" in text and "total parameters: 62,825,219" in text


def test_trace_matches_a_real_forward():
    model = _tiny()
    rows = trace_shapes(model.config, batch_size=3)
    seen = []
    handles = [dict(model.named_modules())[name].register_forward_hook(
        lambda m, a, out, name=name: seen.append((name, tuple(out.shape)))) for name, _ in rows]
    with torch.no_grad():
        model(torch.randn(3, 3, 12, 12, generator=_gen(706)), 1)
    for h in handles:
        h.remove()
    assert seen == rows
    with pytest.raises(ValueError, match="not a multiple of 4"):
        trace_shapes(model.config, image_size=14)


def test_flops_of_ddpm_cifar10():
    flops = flops_per_image(UNetConfig())
    with torch.device("meta"):
        assert UNet(UNetConfig()).flops_per_image(32) == flops
    # 12.1 GFLOP in convolutions and linear layers (GUIDE.md) + 0.34 GFLOP of attention matmuls at 16x16.
    assert 12.3e9 < flops < 12.6e9, flops


# ---------------------------------------------------------------------------------------------- backends
def test_triton_backend_matches_reference():
    """Every GroupNorm through the Triton kernel (CUDA, or TRITON_INTERPRET=1 on the CPU: tests/conftest.py sets it
    through kernel_device) equals the reference. Never skipped: where Triton cannot run, this test fails."""
    from kernel_device import DEVICE

    from fastdiff.ops.backend import triton_device_problem

    device = torch.device(DEVICE)
    problem = triton_device_problem(torch.empty(0, device=device))
    assert problem is None, f"the Triton backend cannot run in this test session: {problem}"
    model = _tiny().to(device)
    x = torch.randn(2, 3, 12, 12, generator=_gen(800)).to(device)
    t = torch.tensor([4, 611], device=device)
    with torch.no_grad():
        ref = model.set_backend("reference")(x, t)
        model.set_backend("triton", attention="reference")
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = model(x.contiguous(memory_format=fmt), t)
            assert_close(out, ref, torch.float32, what=f"triton backend, {fmt}, seed {RUN_SEED}")


_GPU_CONFIG = dict(block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8, attention_head_dim=16,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                   up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], sample_size=32)


@pytest.mark.gpu
def test_float32_on_gpu_matches_diffusers():
    ref = randomize_(UNet2DModel(**_GPU_CONFIG), _gen(810)).eval().cuda()
    model = UNet.from_diffusers(ref)
    x = torch.randn(4, 3, 32, 32, generator=_gen(811)).cuda()
    t = torch.tensor([0, 10, 500.5, 999], device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would make both sides approximate
    try:
        with torch.no_grad():
            expected = ref(x, t).sample
            for backend in ("reference", "auto"):
                got = model.set_backend(backend)(x, t)
                assert_close(got, expected, torch.float32, what=f"cuda float32, backend {backend}, seed {RUN_SEED}")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu_is_as_accurate_as_diffusers(dtype):
    """Against diffusers in float32, fastdiff in half precision errs at most twice as much as diffusers does."""
    from fastdiff.testing import RTOL, relative_error

    ref = randomize_(UNet2DModel(**_GPU_CONFIG), _gen(820)).eval().cuda()
    ref_half = UNet2DModel.from_config(ref.config)
    ref_half.load_state_dict(ref.state_dict())
    ref_half = ref_half.to("cuda", dtype).eval()
    model = UNet.from_diffusers(ref).to(dtype)
    x = torch.randn(4, 3, 32, 32, generator=_gen(821)).cuda()
    t = torch.tensor([0, 10, 500, 999], device="cuda")
    with torch.no_grad():
        exact = ref(x, t).sample
        err_diffusers = relative_error(ref_half(x.to(dtype), t).sample, exact)
        for backend in ("reference", "auto"):
            out = model.set_backend(backend)(x.to(dtype), t)
            assert out.dtype == dtype
            err = relative_error(out, exact)
            assert err <= max(2 * err_diffusers, RTOL[dtype]), (backend, err, err_diffusers)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_forward_in_cuda_graph(backend):
    """The forward pass has no host synchronisation: capture it once, replay it with new inputs and timesteps."""
    model = randomize_(UNet(config_from_diffusers(_GPU_CONFIG)), _gen(830)).eval().cuda().set_backend(backend)
    x = torch.randn(2, 3, 32, 32, generator=_gen(831)).cuda()
    t = torch.tensor([999, 3], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (kernel selection, lazy initialisation)
                model(x, t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t)
        for k, new_t in enumerate(([999, 3], [500, 501], [0, 1000])):
            x.copy_(torch.randn(2, 3, 32, 32, generator=_gen(832 + k)))
            t.copy_(torch.tensor(new_t))
            out.fill_(float("nan"))  # poison: the replay must overwrite every element
            graph.replay()
            assert_close(out, model(x, t), torch.float32, what=f"graph replay {k}, backend {backend}")
