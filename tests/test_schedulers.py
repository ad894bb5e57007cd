"""fastdiff.schedulers against diffusers' DDPMScheduler / DDIMScheduler on the same inputs and noise.

Each step is compared twice:
* with diffusers run in float64 on fastdiff's float64 alphas_cumprod (the exact answer to the same math):
  relative error under EXACT_RTOL; fastdiff's only error is float32 coefficients and arithmetic.
* with stock diffusers in float32: under RTOL[float32] plus diffusers' own float32 error (its distance to the
  float64 run, up to 5e-5 at the cosine schedule's t=999 where alpha-bar is 2.4e-9).
Every step of a chain starts all three from the same x_t (fastdiff's previous output). Random inputs come from
seeds that are zlib.crc32 of the test id (stable across runs and PYTHONHASHSEED), printed in every failure.
Accuracy on realistic inputs (x_t formed from x0 and eps, exact model) is tests/test_step_accuracy.py.
"""

from __future__ import annotations

import inspect
import math
import zlib
from unittest import mock

import numpy as np
import pytest
import torch

from cases import PREDICTIONS, SCHEDULES, SPACINGS, product_cases, stable_seed

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from fastdiff import ops  # noqa: E402
from fastdiff.ops.noise import gaussian_noise_reference  # noqa: E402
from fastdiff.schedulers import (  # noqa: E402
    DDIMConfig,
    DDIMScheduler,
    DDPMConfig,
    DDPMScheduler,
    make_scheduler,
    scheduler_from_diffusers_config,
)
from fastdiff.testing import RTOL, assert_close, relative_error  # noqa: E402

EXACT_RTOL = 1e-6  # fastdiff (float32 table and arithmetic) vs float64 diffusers on the same schedule; measured <= 1e-7
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
SHAPE = (2, 3, 4, 5)  # tiny, with H != W


def dummy_model(x: torch.Tensor, t: int, T: int = 1000) -> torch.Tensor:
    """An analytic stand-in for a UNet: nonlinear in x, depends on t, output of order 1."""
    return 0.7 * torch.sin(3.0 * x) + 0.3 * x * (t / T) - 0.1


def diffusers_twin(ours, float64: bool):
    """diffusers' scheduler for ``ours``' configuration (built from to_diffusers_config, so that is tested too).

    ``float64``: its alphas_cumprod replaced by fastdiff's float64 values, for a float64 run of the same math.
    """
    cfg = ours.to_diffusers_config()
    d = getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)
    if float64:
        d.alphas_cumprod = ours.alphas_cumprod.clone()
        if isinstance(d, diffusers.DDIMScheduler):
            d.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    return d


def diffusers_step(d, model_output, t, x, noise, eta=0.0, use_clipped_model_output=False):
    if isinstance(d, diffusers.DDIMScheduler):
        return d.step(model_output, t, x, eta=eta, use_clipped_model_output=use_clipped_model_output,
                      variance_noise=noise).prev_sample
    # DDPMScheduler.step has no variance_noise argument: hand it our noise through its randn_tensor.
    with mock.patch.object(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise.to(kw["dtype"])):
        return d.step(model_output, t, x).prev_sample


def check_chain(ours, n, seed, eta=0.0, use_clipped_model_output=False, shape=SHAPE, max_steps=None):
    """Set n steps on ours and diffusers (float32 and float64) and compare every step's output."""
    step_kwargs = {}
    if isinstance(ours, DDIMScheduler):
        ours.set_timesteps(n, eta=eta, use_clipped_model_output=use_clipped_model_output)
        step_kwargs = {"eta": eta, "use_clipped_model_output": use_clipped_model_output}  # the table's row
    else:
        ours.set_timesteps(n)
    d32, d64 = diffusers_twin(ours, False), diffusers_twin(ours, True)
    d32.set_timesteps(n)
    d64.set_timesteps(n)
    assert ours.timesteps.tolist() == d32.timesteps.tolist()[:n]
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(shape, generator=gen)
    T = ours.num_train_timesteps
    for i, t in enumerate(ours.timesteps.tolist()[:max_steps]):
        m = dummy_model(x, t, T)
        noise = torch.randn(shape, generator=gen)
        out = ours.step(m, t, x, **step_kwargs, noise=noise).prev_sample
        ref64 = diffusers_step(d64, m.double(), t, x.double(), noise.double(), eta, use_clipped_model_output)
        ref32 = diffusers_step(d32, m, t, x, noise, eta, use_clipped_model_output)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert_close(out, ref64, rtol=EXACT_RTOL, what=f"step {i} (t={t}) vs float64 diffusers, seed {seed}")
        own_error = relative_error(ref32, ref64)
        assert_close(out, ref32, rtol=RTOL[torch.float32] + own_error,
                     what=f"step {i} (t={t}) vs diffusers, seed {seed}")
        x = out


# ----------------------------------------------------------------------------------------------------
# Schedules and timesteps
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_betas_and_alphas_cumprod_match_diffusers(schedule, rescale):
    ours = DDPMScheduler(**SCHEDULES[schedule], rescale_betas_zero_snr=rescale)
    ref = diffusers.DDPMScheduler(**SCHEDULES[schedule], rescale_betas_zero_snr=rescale)
    assert ours.alphas_cumprod.dtype == torch.float64 and ours.alphas_cumprod.device.type == "cpu"
    if not rescale:  # betas are diffusers' float32 values, bit for bit
        assert torch.equal(ours.betas.float(), ref.betas)
    # diffusers' cumprod in float32 drifts from the float64 one: measured up to 1.1e-6 relative (plain), and
    # 3.8e-5 relative on the zero-SNR tail, where diffusers' float32 rescaling subtracts nearly equal numbers
    n = ours.num_train_timesteps - 1 if rescale else ours.num_train_timesteps  # rescaled: last value 0 in both
    ours_ac, ref_ac = ours.alphas_cumprod[:n], ref.alphas_cumprod[:n].double()
    assert ((ours_ac - ref_ac).abs() / ours_ac).max() < (5e-6 if not rescale else 1e-4)
    assert_close(ours.alphas_cumprod_device, ours.alphas_cumprod, rtol=1e-7, what="float32 device copy")
    if rescale:
        assert ours.alphas_cumprod[-1].item() == 0.0
        assert ours.alphas_cumprod[0].item() == pytest.approx(1 - ours.betas[0].item(), rel=1e-6)


def test_alphas_cumprod_golden():
    """Closed forms: linear betas beta_i = b0 + (b1 - b0) i / (T - 1); cosine alpha-bar(t) = f(t+1) / f(0)."""
    T = 1000
    lin = DDPMScheduler().alphas_cumprod
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    expected = np.cumprod([1 - b for b in betas])
    assert np.allclose(lin.numpy(), expected, rtol=1e-6, atol=0)
    assert lin[999].item() == pytest.approx(4.0358e-05, rel=1e-4)  # the DDPM paper's schedule at t = T
    cos = DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod

    def f(s):
        return math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 1, 10, 250, 500, 750, 900):  # before beta reaches its 0.999 cap
        assert cos[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


GOLDEN_TIMESTEPS = [
    # (spacing, steps_offset, n, T, timesteps): worked out by hand from diffusers' rules
    ("leading", 0, 10, 1000, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("leading", 1, 10, 1000, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("trailing", 0, 10, 1000, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", 0, 10, 1000, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ("leading", 0, 3, 1000, [666, 333, 0]),
    ("trailing", 0, 3, 1000, [999, 666, 332]),  # round(1000, 666.67, 333.33) - 1
    ("linspace", 0, 3, 1000, [999, 500, 0]),  # 499.5 rounds half to even
    ("leading", 0, 1, 1000, [0]),
    ("trailing", 0, 1, 1000, [999]),
    ("linspace", 0, 1, 1000, [0]),
    ("leading", 0, 4, 4, [3, 2, 1, 0]),
]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing,offset,n,T,expected", GOLDEN_TIMESTEPS)
def test_timesteps_golden(cls, spacing, offset, n, T, expected):
    s = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == expected
    assert s.timesteps.dtype == torch.int64 and s.num_inference_steps == n


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_timesteps_match_diffusers(cls, spacing, offset):
    for T, steps in ((1000, [1, 2, 3, 7, 10, 25, 50, 61, 100, 103, 250, 333, 999, 1000]), (100, range(1, 100))):
        ours = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        ref = diffusers_twin(ours, False)
        for n in steps:
            ref.set_timesteps(n)
            expected = ref.timesteps.tolist()
            if expected[0] >= T:  # leading + steps_offset past the end: diffusers would index out of range
                with pytest.raises(ValueError, match="is too large"):
                    ours.set_timesteps(n)
                continue
            ours.set_timesteps(n)
            if len(expected) == n + 1:  # diffusers' trailing grid with a spurious final -1: fastdiff drops it
                assert spacing == "trailing" and expected[-1] == -1, (n, expected[-3:])
                expected = expected[:n]
            assert ours.timesteps.tolist() == expected, (T, n)
            assert len(ours.timesteps) == n


def test_trailing_spurious_timestep_is_dropped():
    """Labelled edge case: diffusers' trailing grid for 61 of 1000 steps has 62 entries ending in -1."""
    ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1].item() == -1
    ours = DDIMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(61)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()[:61]


# ----------------------------------------------------------------------------------------------------
# add_noise
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_add_noise_matches_diffusers(cls, schedule):
    ours = cls(**SCHEDULES[schedule])
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(5, 3, 4, 5, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 499, 998, 999])  # labelled edges: both ends of the chain
    out = ours.add_noise(x0, noise, t)
    ref32 = diffusers_twin(ours, False).add_noise(x0, noise, t)
    ref64 = diffusers_twin(ours, True).add_noise(x0.double(), noise.double(), t)
    assert out.dtype == torch.float32
    assert_close(out, ref64, rtol=EXACT_RTOL, what="add_noise vs float64 diffusers")
    assert_close(out, ref32, rtol=RTOL[torch.float32], what="add_noise vs diffusers")
    # one timestep for the whole batch, given as an int or a 0-dim tensor
    for t_all in (250, torch.tensor(250)):
        ref = diffusers_twin(ours, True).add_noise(x0.double(), noise.double(), torch.tensor([250] * 5))
        assert_close(ours.add_noise(x0, noise, t_all), ref, rtol=EXACT_RTOL, what="add_noise, one timestep")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_low_precision(dtype):
    ours = DDPMScheduler()
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([10, 900])
    out = ours.add_noise(x0.to(dtype), noise.to(dtype), t)
    ref = diffusers_twin(ours, True).add_noise(x0.to(dtype).double(), noise.to(dtype).double(), t)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------------------------------
# Step chains against diffusers
# ----------------------------------------------------------------------------------------------------

_DDPM_ARGS, _DDPM_CASES = product_cases({"schedule": list(SCHEDULES), "prediction": PREDICTIONS, "variance": VARIANCES,
                                         "spacing": SPACINGS, "clip": (True, False), "offset": (0, 1)}, quick_every=11)


@pytest.mark.parametrize(_DDPM_ARGS, _DDPM_CASES)
def test_ddpm_steps_match_diffusers(request, schedule, prediction, variance, spacing, clip, offset):
    ours = DDPMScheduler(**SCHEDULES[schedule], variance_type=variance, clip_sample=clip, prediction_type=prediction,
                         timestep_spacing=spacing, steps_offset=offset)
    check_chain(ours, 7, seed=stable_seed(request))


_DDIM_ARGS, _DDIM_CASES = product_cases({"schedule": list(SCHEDULES), "prediction": PREDICTIONS, "spacing": SPACINGS,
                                         "clip": (True, False), "eta": (0.0, 0.5, 1.0), "alpha_to_one": (True, False),
                                         "offset": (0, 1)}, quick_every=17)


@pytest.mark.parametrize(_DDIM_ARGS, _DDIM_CASES)
def test_ddim_steps_match_diffusers(request, schedule, prediction, spacing, clip, eta, alpha_to_one, offset):
    ours = DDIMScheduler(**SCHEDULES[schedule], clip_sample=clip, prediction_type=prediction, timestep_spacing=spacing,
                         set_alpha_to_one=alpha_to_one, steps_offset=offset)
    check_chain(ours, 7, seed=stable_seed(request), eta=eta)


@pytest.mark.parametrize("n", [1, 2, 50, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_counts_match_diffusers(cls, n):
    """Labelled edge counts: one step, two steps, many; the full 1000-step chain is slow."""
    kwargs = {"eta": 1.0} if cls is DDIMScheduler else {}
    check_chain(cls(clip_sample_range=2.0), n, seed=n, **kwargs)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_use_clipped_model_output(prediction, eta):
    ours = DDIMScheduler(prediction_type=prediction, clip_sample_range=0.5)
    check_chain(ours, 6, seed=3, eta=eta, use_clipped_model_output=True)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_zero_snr_matches_diffusers(cls, spacing):
    """Rescaled betas (alpha-bar_{T-1} = 0) with v-prediction, the combination that schedule is meant for."""
    ours = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
               prediction_type="v_prediction", timestep_spacing=spacing)
    check_chain(ours, 5, seed=4, **({"eta": 1.0} if cls is DDIMScheduler else {}))


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_step_eta_override(eta):
    """step(eta=...) other than set_timesteps' recomputes the row on the host and equals diffusers at that eta."""
    ours = DDIMScheduler(prediction_type="v_prediction")
    ours.set_timesteps(5, eta=0.0)
    d64 = diffusers_twin(ours, True)
    d64.set_timesteps(5)
    gen = torch.Generator().manual_seed(5)
    x, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    for t in ours.timesteps.tolist():
        m = dummy_model(x, t)
        ref = diffusers_step(d64, m.double(), t, x.double(), noise.double(), eta=eta)
        assert_close(ours.step(m, t, x, noise=noise, eta=eta).prev_sample, ref, rtol=EXACT_RTOL,
                     what=f"eta override, t={t}")
        det = diffusers_step(d64, m.double(), t, x.double(), None, eta=0.0)
        assert_close(ours.step(m, t, x, noise=noise).prev_sample, det, rtol=EXACT_RTOL, what=f"table eta 0, t={t}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_low_precision(cls, dtype):
    ours = cls(prediction_type="v_prediction")
    ours.set_timesteps(4, **({"eta": 0.5} if cls is DDIMScheduler else {}))
    d64 = diffusers_twin(ours, True)
    d64.set_timesteps(4)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(SHAPE, generator=gen).to(dtype)
    for t in ours.timesteps.tolist():
        m, noise = dummy_model(x.float(), t).to(dtype), torch.randn(SHAPE, generator=gen).to(dtype)
        out = ours.step(m, t, x, **({"eta": 0.5} if cls is DDIMScheduler else {}), noise=noise).prev_sample
        ref = diffusers_step(d64, m.double(), t, x.double(), noise.double(), eta=0.5)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, what=f"{dtype} step t={t}")
        x = out


# ----------------------------------------------------------------------------------------------------
# Golden values
# ----------------------------------------------------------------------------------------------------


def test_ddim_golden_linear_model():
    """Deterministic DDIM on m = c x_t: x_{t'} = k x_t with k = sqrt(a') (1 - sqrt(1-a) c) / sqrt(a) + sqrt(1-a') c."""
    c = 0.3
    ours = DDIMScheduler(clip_sample=False)
    ours.set_timesteps(10)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) / 60.0 - 1.0
    expected = x.double()
    for t in ours.timesteps.tolist():
        a, a_prev = ours.alphas_cumprod[t].item(), (ours.alphas_cumprod[t - 100].item() if t >= 100 else 1.0)
        k = math.sqrt(a_prev) * (1 - math.sqrt(1 - a) * c) / math.sqrt(a) + math.sqrt(1 - a_prev) * c
        x = ours.step(c * x, t, x).prev_sample
        expected = k * expected
    assert_close(x, expected, rtol=EXACT_RTOL, what="golden DDIM chain")


# Final samples of short chains from golden_chain, computed once with diffusers 0.42.1 in float64 on fastdiff's
# alphas_cumprod (diffusers_twin(..., float64=True)); fixed here so that a change in either library shows up.
GOLDEN_CHAINS = {
    # name: (class, config, steps, eta, sum of the final sample, its element [1, 2, 3, 4])
    "ddim_leading_eps": (DDIMScheduler, {}, 10, 0.0, -8.226958454755701, 0.06044008177430619),
    "ddim_trailing_cosine_sample_eta": (
        DDIMScheduler, {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "trailing",
                        "set_alpha_to_one": False}, 6, 0.5, -14.093823839622393, 0.5879949939234618),
    "ddpm_linspace_v_large": (
        DDPMScheduler, {"prediction_type": "v_prediction", "variance_type": "fixed_large", "timestep_spacing": "linspace"},
        8, 0.0, 12.031292006065538, 0.022734894565969586),
}


def golden_chain(cls, config, n, eta):
    """The scheduler with n steps set, an arange sample x_T and a fixed analytic noise pattern (float64)."""
    s = cls(**config)
    s.set_timesteps(n, **({"eta": eta} if cls is DDIMScheduler else {}))
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5) / 60.0 - 1.0
    noise = torch.cos(torch.arange(x.numel(), dtype=torch.float64) * 0.7).reshape(x.shape)
    return s, x, noise


@pytest.mark.parametrize("name", list(GOLDEN_CHAINS))
def test_golden_chains(name):
    cls, config, n, eta, total, element = GOLDEN_CHAINS[name]
    s, x, noise = golden_chain(cls, config, n, eta)
    x = x.float()
    for t in s.timesteps.tolist():
        x = s.step(dummy_model(x, t), t, x, **({"eta": eta} if cls is DDIMScheduler else {}),
                   noise=noise.float()).prev_sample
    assert x.double().sum().item() == pytest.approx(total, rel=1e-5)
    assert x[1, 2, 3, 4].item() == pytest.approx(element, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Device-side stepping, seeds, timestep forms
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_at_equals_step(cls):
    s = cls(prediction_type="sample")
    s.set_timesteps(6, **({"eta": 0.8} if cls is DDIMScheduler else {}))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(SHAPE, generator=gen)
    seeds = torch.tensor([11, 2**40 + 3], dtype=torch.int64)
    eta = {"eta": 0.8} if cls is DDIMScheduler else {}
    for i, t in enumerate(s.timesteps.tolist()):
        m, noise = dummy_model(x, t), torch.randn(SHAPE, generator=gen)
        index = torch.tensor(i, dtype=torch.int64)
        assert torch.equal(s.step_at(m, index, x, noise=noise), s.step(m, t, x, **eta, noise=noise).prev_sample)
        assert torch.equal(s.step_at(m, i, x, seeds=seeds), s.step(m, s.timesteps[i], x, **eta, seeds=seeds)[0])
        x = s.step(m, t, x, **eta, noise=noise).prev_sample


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_at_reads_nothing_from_the_device(cls):
    """On the meta device any host read (.item(), bool(), int()) raises, so this proves step_at never syncs."""
    s = cls()
    s.set_timesteps(5, device="meta", **({"eta": 1.0} if cls is DDIMScheduler else {}))
    x = torch.empty(SHAPE, device="meta")
    index = torch.zeros((), dtype=torch.int64, device="meta")
    seeds = torch.zeros(SHAPE[0], dtype=torch.int64, device="meta")
    out = s.step_at(x, index, x, seeds=seeds)
    assert out.device.type == "meta" and out.shape == x.shape
    eta = {"eta": 1.0} if cls is DDIMScheduler else {}
    out = s.step(x, s.timesteps[2], x, **eta, seeds=seeds)  # an element of .timesteps maps to its row from metadata
    assert out.prev_sample.device.type == "meta" and out.pred_original_sample.device.type == "meta"
    with pytest.raises(ValueError, match="not an element of .timesteps"):
        s.step(x, torch.tensor(500, device="meta"), x, **eta, seeds=seeds)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_seeded_noise_independent_of_batch(cls):
    s = cls()
    s.set_timesteps(4, **({"eta": 1.0} if cls is DDIMScheduler else {}))
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5, 3, 4, 5, generator=gen)
    seeds = torch.tensor([3, 1, 4, 1 << 50, 9], dtype=torch.int64)
    i, t = 1, s.timesteps[1].item()
    m = dummy_model(x, t)
    eta = {"eta": 1.0} if cls is DDIMScheduler else {}
    full = s.step(m, t, x, **eta, seeds=seeds).prev_sample
    for lo, hi in ((0, 1), (1, 4), (3, 5)):
        part = s.step(m[lo:hi], t, x[lo:hi], **eta, seeds=seeds[lo:hi]).prev_sample
        assert torch.equal(part, full[lo:hi]), (lo, hi)
    # the seeded noise is the Philox stream of this step, scaled by the row's noise std
    deterministic = s.step(m, t, x, **eta, noise=torch.zeros_like(x)).prev_sample
    z = gaussian_noise_reference(seeds, ops.step_stream(t), x.shape[1:])
    std = s.coeffs[i, ops.STEP_COEFFS.index("noise_std")]
    assert std > 0 and s.noise_streams[i].item() == ops.step_stream(t)
    assert_close(full - deterministic, std * z, rtol=1e-5, what="seeded noise")


def test_noise_drawn_only_when_needed():
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(3)
    x = torch.randn(SHAPE)
    m = dummy_model(x, 500)
    t0 = ddpm.timesteps[0].item()
    assert not torch.equal(ddpm.step(m, t0, x)[0], ddpm.step(m, t0, x)[0])  # torch's global generator
    assert torch.equal(ddpm.step(m, 0, x)[0], ddpm.step(m, 0, x)[0])  # t = 0: no noise
    ddim = DDIMScheduler()
    ddim.set_timesteps(3)
    assert not ddim.needs_noise and torch.equal(ddim.step(m, t0, x)[0], ddim.step(m, t0, x)[0])
    assert torch.equal(ddim.step_at(m, 0, x), ddim.step(m, t0, x)[0])
    ddim.set_timesteps(3, eta=1.0)
    assert ddim.needs_noise
    with pytest.raises(ValueError, match="pass noise= or seeds="):
        ddim.step_at(m, 0, x)
    one_step = DDPMScheduler()
    one_step.set_timesteps(1)  # the only timestep is 0
    assert not one_step.needs_noise


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_buffers(cls):
    s = cls(clip_sample_range=1.5)
    s.set_timesteps(7)
    assert s.coeffs.shape == (7, ops.N_STEP_COEFFS) and s.coeffs.dtype == torch.float32
    assert torch.isfinite(s.coeffs).all()
    assert s.noise_streams.dtype == torch.int32
    assert s.noise_streams.tolist() == [ops.step_stream(t) for t in s.timesteps.tolist()]
    assert s.clip_range == 1.5 and cls(clip_sample=False).clip_range is None
    assert s.init_noise_sigma == 1.0 and s.num_train_timesteps == 1000 and s.num_inference_steps == 7


def test_timestep_forms():
    s = DDIMScheduler()
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    m = dummy_model(x, 500)
    ref = s.step(m, 500, x).prev_sample
    for t in (np.int64(500), torch.tensor(500), torch.tensor([500]), s.timesteps[1]):
        assert torch.equal(s.step(m, t, x).prev_sample, ref), t
    for t in s.timesteps:  # iterating the buffer yields views of its elements
        s.step(m, t, x)


def test_img2img_start():
    s = DDIMScheduler()
    s.set_timesteps(50)
    assert s.img2img_start(0.8) == 10  # init_timestep = 40
    assert s.img2img_start(1.0) == 0 and s.img2img_start(0.0) == 50
    assert s.img2img_start(0.333) == 34  # int(16.65) = 16
    for bad in (-0.1, 1.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="strength"):
            s.img2img_start(bad)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,ref_cls,config_cls", [
    (DDPMScheduler, diffusers.DDPMScheduler, DDPMConfig), (DDIMScheduler, diffusers.DDIMScheduler, DDIMConfig)])
def test_defaults_equal_diffusers(ours_cls, ref_cls, config_cls):
    ref = inspect.signature(ref_cls.__init__).parameters
    ours = inspect.signature(ours_cls.__init__).parameters
    for f in config_cls.__dataclass_fields__.values():
        assert f.default == ref[f.name].default == ours[f.name].default, f.name


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_diffusers_config_round_trip(cls):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing", "clip_sample": False, "steps_offset": 1}
    ours = cls(**config)
    ref = getattr(diffusers, cls.__name__).from_config(ours.to_diffusers_config())
    again = cls.from_diffusers_config(dict(ref.config))
    assert public(again.config) == ours.config  # private keys of diffusers' config ride along, as in diffusers
    via_factory = scheduler_from_diffusers_config({"_class_name": cls.__name__, **dict(ref.config)})
    assert type(via_factory) is cls and public(via_factory.config) == ours.config
    assert type(make_scheduler(cls.__name__[:4].lower(), **config)) is cls


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_from_diffusers_config_ignores_unused_keys():
    cfg = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.8.0", "variance_type": "fixed_large",
           "set_alpha_to_one": False, "thresholding": False, "sample_max_value": 1.0, "num_train_timesteps": 500}
    ddim = DDIMScheduler.from_diffusers_config(cfg)
    assert ddim.config.set_alpha_to_one is False and ddim.num_train_timesteps == 500
    ddpm = scheduler_from_diffusers_config(cfg)
    assert isinstance(ddpm, DDPMScheduler) and ddpm.config.variance_type == "fixed_large"
    trained = DDPMScheduler(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4])
    assert public(DDPMScheduler.from_diffusers_config(trained.to_diffusers_config()).config) == trained.config
    assert trained.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7 * 0.6, rel=1e-7)


BAD_CONFIGS = [
    (DDPMScheduler, {"thresholding": True}, r"thresholding=True \(dynamic thresholding\) is not supported"),
    (DDIMScheduler, {"thresholding": True}, r"thresholding=True \(dynamic thresholding\) is not supported"),
    (DDPMScheduler, {"variance_type": "learned_range"}, "variance_type 'learned_range' is not supported"),
    (DDPMScheduler, {"variance_type": "learned"}, "variance_type 'learned' is not supported"),
    (DDPMScheduler, {"variance_type": "fixed_large_log"}, "variance_type 'fixed_large_log' is not supported"),
    (DDPMScheduler, {"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not supported"),
    (DDIMScheduler, {"prediction_type": "flow"}, "prediction_type 'flow' is not supported"),
    (DDIMScheduler, {"timestep_spacing": "karras"}, "timestep_spacing 'karras' is not supported"),
    (DDIMScheduler, {"num_train_timesteps": 0}, "num_train_timesteps must be a positive integer"),
    (DDIMScheduler, {"steps_offset": -1}, "steps_offset must be an integer >= 0"),
    (DDIMScheduler, {"clip_sample_range": 0.0}, "clip_sample_range must be a number > 0"),
    (DDPMScheduler, {"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values, expected num_train_timesteps=1000"),
    (DDPMScheduler, {"beta_start": 0.0}, r"betas must lie in \(0, 1\]"),
]


@pytest.mark.parametrize("cls,config,message", BAD_CONFIGS)
def test_bad_configs(cls, config, message):
    with pytest.raises(ValueError, match=message):
        cls.from_diffusers_config(config)


def test_bad_factory_names():
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        make_scheduler("pndm")
    with pytest.raises(ValueError, match="scheduler class 'PNDMScheduler' is not supported"):
        scheduler_from_diffusers_config({"_class_name": "PNDMScheduler"})


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_steps_and_timesteps(cls):
    s = cls()
    x = torch.randn(SHAPE)
    if cls is DDIMScheduler:  # as diffusers: DDIM needs set_timesteps, DDPM steps every training timestep without
        with pytest.raises(ValueError, match="call set_timesteps"):
            s.step(x, 0, x)
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.img2img_start(0.5)
    for n in (0, -3, 2.5, True, "10", None):
        with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match="exceeds num_train_timesteps=1000"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        s.set_timesteps(10, eta=-0.5)
    s.set_timesteps(10)
    if cls is DDPMScheduler:
        with pytest.raises(ValueError, match="timestep 901 is not in this schedule"):
            s.step(x, 901, x)
    else:  # diffusers' DDIM steps any timestep t to t - T // n
        with pytest.raises(ValueError, match="timestep 1000 is outside"):
            s.step(x, 1000, x)
    with pytest.raises(ValueError, match="timestep must be an integer"):
        s.step(x, 900.0, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:1], 900, x)
    with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
        s.step(x.numpy(), 900, x)
    with pytest.raises(ValueError, match="steps_offset=5 is too large"):
        cls(num_train_timesteps=10, steps_offset=5).set_timesteps(2)
    with pytest.raises(ValueError, match="add_noise: timesteps must lie in"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="add_noise: 3 timesteps for 2 samples"):
        s.add_noise(x, x, torch.tensor([0, 1, 2]))


def test_scheduler_specific_errors():
    with pytest.raises(ValueError, match="DDPMScheduler has no eta"):
        DDPMScheduler().set_timesteps(10, eta=0.5)
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    x = torch.randn(SHAPE)
    with pytest.raises(TypeError, match="eta"):  # as diffusers' DDPMScheduler.step
        ddpm.step(x, 900, x, eta=1.0)
    ddim = DDIMScheduler()
    ddim.set_timesteps(5, eta=0.5)
    with pytest.raises(ValueError, match="eta=2.0 is too large"):
        ddim.set_timesteps(10, eta=2.0)
    assert ddim.num_inference_steps == 5 and ddim.eta == 0.5 and len(ddim.timesteps) == 5  # left as it was
    zero_snr = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="epsilon-prediction model cannot give x0"):
        zero_snr.set_timesteps(10)


# ----------------------------------------------------------------------------------------------------
# Backends: the Triton update step and CUDA-graph capture of step_at
# ----------------------------------------------------------------------------------------------------

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_triton_backend_matches_reference(cls):
    """The scheduler's buffers drive the Triton kernel (CUDA, or TRITON_INTERPRET=1 on the CPU) as the reference."""
    # conftest settles TRITON_INTERPRET on a machine without CUDA, so Triton must run here: a problem is a failure
    problem = ops.backend.triton_device_problem(torch.empty(0, device=_DEVICE))
    assert problem is None, f"the Triton backend cannot run on {_DEVICE}: {problem}"
    s = cls(prediction_type="v_prediction")
    s.set_timesteps(4, device=_DEVICE, **({"eta": 0.7} if cls is DDIMScheduler else {}))
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(SHAPE, generator=gen).to(_DEVICE)
    seeds = torch.tensor([5, 1 << 40], dtype=torch.int64, device=_DEVICE)
    for i, t in enumerate(s.timesteps.tolist()):
        m = dummy_model(x, t)
        noise = torch.randn(SHAPE, generator=gen).to(_DEVICE)
        for kwargs in ({"noise": noise}, {"seeds": seeds}):
            s.backend = "reference"
            ref = s.step_at(m, torch.tensor(i, device=_DEVICE), x, **kwargs)
            s.backend = "triton"
            out = s.step_at(m, torch.tensor(i, device=_DEVICE), x, **kwargs)
            assert_close(out, ref, what=f"triton step {i} {list(kwargs)}")
        x = ref


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_at_in_cuda_graph(cls, backend):
    """Capture step_at with a device step index once; every replay equals the eager step and the CPU reference."""
    dev = torch.device("cuda")
    eta = {"eta": 1.0} if cls is DDIMScheduler else {}
    s, cpu = cls(backend=backend), cls(backend="reference")
    s.set_timesteps(5, device=dev, **eta)
    cpu.set_timesteps(5, **eta)
    x_cpu = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    m_cpu = dummy_model(x_cpu, 500)
    x, m = x_cpu.to(dev), m_cpu.to(dev)
    seeds = torch.tensor([3, 4], dtype=torch.int64, device=dev)
    eager = [s.step(m, t, x, **eta, seeds=seeds).prev_sample for t in s.timesteps]
    index = torch.zeros((), dtype=torch.int64, device=dev)
    out = torch.full_like(x, float("nan"))  # poisoned
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            out.copy_(s.step_at(m, index, x, seeds=seeds))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(s.step_at(m, index, x, seeds=seeds))
        index.add_(1)
    for _ in range(2):
        index.zero_()
        for i, t in enumerate(cpu.timesteps.tolist()):
            out.fill_(float("nan"))
            graph.replay()
            assert_close(out, eager[i], rtol=1e-6, what=f"replay step {i} vs eager")
            ref = cpu.step(m_cpu, t, x_cpu, **eta, seeds=seeds.cpu()).prev_sample
            assert_close(out, ref, what=f"replay step {i} vs CPU reference")
