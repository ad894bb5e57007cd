"""fastdiff.DPMSolverMultistepScheduler against diffusers' DPMSolverMultistepScheduler (0.42.1).

* diffusers' own golden loops (tests/schedulers/test_scheduler_dpm_multi.py), their bodies unchanged, with
  fastdiff's class;
* step by step on random inputs across the options, each step compared twice, as tests/test_schedulers.py does:
  with diffusers' own algorithm run in float64 on fastdiff's float64 sigma grid (the exact answer: fastdiff's only
  error is its float32 table and arithmetic), and with stock diffusers in float32 (RTOL[float32] plus diffusers'
  own float32 error, its distance to the float64 run);
* the sigma grid and timesteps against diffusers; step_at, the history ring, begin index, add_noise, seeds,
  generator noise, errors.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import types
from unittest import mock

import numpy as np
import pytest
import torch

from cases import product_cases

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_dpmsolver_multistep as dpm_module  # noqa: E402

from fastdiff import DPMSolverMultistepScheduler, ops  # noqa: E402
from fastdiff.ops import dpm_reference  # noqa: E402
from fastdiff.ops.noise import gaussian_noise_reference  # noqa: E402
from fastdiff.schedulers import SCHEDULERS, make_scheduler, scheduler_from_diffusers_config  # noqa: E402
from fastdiff.testing import RTOL, assert_close, relative_error  # noqa: E402

Ours = DPMSolverMultistepScheduler
EXACT_RTOL = 2e-6  # fastdiff (float32 table and arithmetic) vs float64 diffusers on the same grid
SHAPE = (2, 3, 4, 5)


# ----------------------------------------------------------------------------------------------------
# diffusers' golden loops (test_scheduler_dpm_multi.py, DPMSolverMultistepSchedulerTest), bodies unchanged
# ----------------------------------------------------------------------------------------------------


def dummy_model():
    def model(sample, t, *args):
        if isinstance(t, torch.Tensor):
            num_dims = len(sample.shape)
            t = t.reshape(-1, *(1,) * (num_dims - 1)).to(sample.device, dtype=sample.dtype)
        return sample * t / (t + 1)

    return model


def _deter(flip: bool):
    batch_size, num_channels, height, width = 4, 3, 8, 8
    num_elems = batch_size * num_channels * height * width
    sample = torch.arange(num_elems)
    if flip:
        sample = sample.flip(-1)
    sample = sample.reshape(num_channels, height, width, batch_size)
    sample = sample / num_elems
    return sample.permute(3, 0, 1, 2)


def get_scheduler_config(**kwargs):
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": False,
        "euler_at_final": False,
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "final_sigmas_type": "sigma_min",
    }
    config.update(**kwargs)
    return config


def full_loop(scheduler_class=Ours, scheduler=None, **config):
    if scheduler is None:
        scheduler = scheduler_class(**get_scheduler_config(**config))
    num_inference_steps = 10
    model = dummy_model()
    sample = _deter(False)
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        residual = model(sample, t)
        sample = scheduler.step(residual, t, sample, generator=generator).prev_sample
    return sample


def full_loop_custom_timesteps(scheduler_class=Ours, **config):
    scheduler_config = get_scheduler_config(**config)
    scheduler = scheduler_class(**scheduler_config)
    num_inference_steps = 10
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    scheduler = scheduler_class(**scheduler_config)
    scheduler.set_timesteps(num_inference_steps=None, timesteps=timesteps)
    generator = torch.manual_seed(0)
    model = dummy_model()
    sample = _deter(False)
    for i, t in enumerate(scheduler.timesteps):
        residual = model(sample, t)
        sample = scheduler.step(residual, t, sample, generator=generator).prev_sample
    return sample


def check_over_configs(time_step=0, **config):
    """diffusers' check_over_configs (the stepping loop unchanged; the scheduler saved and loaded back)."""
    num_inference_steps = 25
    sample = torch.rand((4, 3, 8, 8))
    residual = 0.1 * sample
    dummy_past_residuals = [residual + 0.2, residual + 0.15, residual + 0.10]
    scheduler = Ours(**get_scheduler_config(**config))
    scheduler.set_timesteps(num_inference_steps)
    scheduler.model_outputs = dummy_past_residuals[: scheduler.config.solver_order]
    with tempfile.TemporaryDirectory() as tmpdirname:
        scheduler.save_config(tmpdirname)
        new_scheduler = Ours.from_pretrained(tmpdirname)
    new_scheduler.set_timesteps(num_inference_steps)
    new_scheduler.model_outputs = dummy_past_residuals[: new_scheduler.config.solver_order]
    output, new_output = sample, sample
    for t in range(time_step, time_step + scheduler.config.solver_order + 1):
        t = new_scheduler.timesteps[t]
        output = scheduler.step(residual, t, output).prev_sample
        new_output = new_scheduler.step(residual, t, new_output).prev_sample
        assert torch.sum(torch.abs(output - new_output)) < 1e-5, "Scheduler outputs are not identical"
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("config,golden", [
    ({}, 0.3301),
    ({"thresholding": True, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5}, 1.1364),
    ({"prediction_type": "v_prediction"}, 0.2251),
    ({"prediction_type": "v_prediction", "use_karras_sigmas": True}, 0.2096),
    ({"prediction_type": "v_prediction", "use_lu_lambdas": True}, 0.1554),
], ids=["no_noise", "thresholding", "v_prediction", "karras_v", "lu_v"])
def test_full_loop_goldens(config, golden):
    sample = full_loop(**config)
    result_mean = torch.mean(torch.abs(sample))
    assert abs(result_mean.item() - golden) < 1e-3


def test_full_loop_with_noise_golden():
    scheduler = Ours(**get_scheduler_config())
    num_inference_steps = 10
    t_start = 5
    model = dummy_model()
    sample = _deter(False)
    scheduler.set_timesteps(num_inference_steps)
    noise = _deter(True)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    sample = scheduler.add_noise(sample, noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        residual = model(sample, t)
        sample = scheduler.step(residual, t, sample).prev_sample
    result_sum = torch.sum(torch.abs(sample))
    result_mean = torch.mean(torch.abs(sample))
    assert abs(result_sum.item() - 318.4111) < 1e-2, f" expected result sum 318.4111, but get {result_sum}"
    assert abs(result_mean.item() - 0.4146) < 1e-3, f" expected result mean 0.4146, but get {result_mean}"


def test_switch_golden():
    """diffusers' test_switch: the config survives a round trip through the other multistep solvers."""
    scheduler = Ours(**get_scheduler_config())
    assert abs(torch.mean(torch.abs(full_loop(scheduler=scheduler))).item() - 0.3301) < 1e-3
    config = scheduler.to_diffusers_config()
    for cls in (diffusers.DPMSolverSinglestepScheduler, diffusers.UniPCMultistepScheduler,
                diffusers.DEISMultistepScheduler):
        config = dict(cls.from_config(config).config)
    scheduler = Ours.from_config(config)
    assert abs(torch.mean(torch.abs(full_loop(scheduler=scheduler))).item() - 0.3301) < 1e-3


def test_solver_order_and_type_loops():
    for algorithm_type in ["dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"]:
        for solver_type in ["midpoint", "heun"]:
            for order in [1, 2, 3]:
                for prediction_type in ["epsilon", "sample"]:
                    if algorithm_type in ["sde-dpmsolver", "sde-dpmsolver++"]:
                        if order == 3:
                            continue
                    else:
                        check_over_configs(solver_order=order, solver_type=solver_type,
                                           prediction_type=prediction_type, algorithm_type=algorithm_type)
                    sample = full_loop(solver_order=order, solver_type=solver_type, prediction_type=prediction_type,
                                       algorithm_type=algorithm_type)
                    assert not torch.isnan(sample).any(), "Samples have nan numbers"


def test_check_over_configs():
    for timesteps in [25, 50, 100, 999, 1000]:
        check_over_configs(num_train_timesteps=timesteps)
    for order in [1, 2, 3]:
        for solver_type in ["midpoint", "heun"]:
            for threshold in [0.5, 1.0, 2.0]:
                for prediction_type in ["epsilon", "sample"]:
                    check_over_configs(thresholding=True, prediction_type=prediction_type, sample_max_value=threshold,
                                       algorithm_type="dpmsolver++", solver_order=order, solver_type=solver_type)
    for kwargs in ({"prediction_type": "v_prediction"}, {"lower_order_final": True}, {"euler_at_final": True},
                   {"lambda_min_clipped": -5.1}, {"variance_type": "learned_range"},
                   {"rescale_betas_zero_snr": True}, {"use_beta_sigmas": True}, {"use_exponential_sigmas": True}):
        check_over_configs(**kwargs)


def test_custom_timesteps_golden():
    for algorithm_type in ["dpmsolver++", "sde-dpmsolver++"]:
        for prediction_type in ["epsilon", "sample", "v_prediction"]:
            for final_sigmas_type in ["sigma_min", "zero"]:
                kw = dict(algorithm_type=algorithm_type, prediction_type=prediction_type,
                          final_sigmas_type=final_sigmas_type)
                sample = full_loop(**kw)
                sample_custom_timesteps = full_loop_custom_timesteps(**kw)
                assert torch.sum(torch.abs(sample - sample_custom_timesteps)) < 1e-5, kw


def test_fp16_and_duplicated_timesteps():
    scheduler = Ours(**get_scheduler_config(thresholding=True, dynamic_thresholding_ratio=0))
    model = dummy_model()
    sample = _deter(False).half()
    scheduler.set_timesteps(10)
    for i, t in enumerate(scheduler.timesteps):
        residual = model(sample, t)
        sample = scheduler.step(residual, t, sample).prev_sample
    assert sample.dtype == torch.float16
    scheduler = Ours(**get_scheduler_config())
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    assert len(scheduler.timesteps) == scheduler.num_inference_steps
    assert torch.isfinite(scheduler.coeffs).all()


def test_step_output_and_protocol():
    s = Ours(solver_order=2)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    out = s.step(dummy_nonlinear_model(x, 999), s.timesteps[0], x)
    x0 = (x - s.step_sigmas[0] * dummy_nonlinear_model(x, 999)) / s.step_alphas[0]
    assert_close(out.pred_original_sample, x0, rtol=1e-6, what="pred_original_sample")
    assert torch.equal(out[0], out.prev_sample) and len(s.step(x, s.timesteps[1], x, return_dict=False)) == 1
    with pytest.raises(ValueError, match="only one of"):
        s.step(x, s.timesteps[2], x, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(TypeError, match="unexpected keyword"):
        Ours(solver_oder=2)
    assert {c.__name__ for c in s.compatibles} >= {"DDPMScheduler", "DDIMScheduler"}
    ddim = SCHEDULERS["ddim"].from_config(s.config)  # DPM-only keys are a sibling's: dropped quietly, kept in config
    assert ddim.config["solver_order"] == 2 and Ours.from_config(ddim.config).config["solver_order"] == 2


def test_inference_step_counts_and_shapes():
    for n in [1, 2, 3, 5, 10, 50, 100, 999, 1000]:
        s = Ours(**get_scheduler_config())
        s.set_timesteps(n)
        x = torch.rand(4, 3, 8, 8)
        out = s.step(0.1 * x, s.timesteps[0], x).prev_sample
        assert out.shape == x.shape and torch.isfinite(out).all()
    s = Ours(**get_scheduler_config())
    s.set_timesteps(25)
    x = torch.rand(4, 3, 8, 8)
    assert s.step(0.1 * x, s.timesteps[5], x).prev_sample.shape == x.shape
    assert s.step(0.1 * x, s.timesteps[6], x, return_dict=False)[0].shape == x.shape


# ----------------------------------------------------------------------------------------------------
# Step by step against diffusers (float32, and its own algorithm in float64)
# ----------------------------------------------------------------------------------------------------


class _Float64Torch(types.ModuleType):
    """``torch`` for diffusers' scheduler module with float32 meaning float64, so its step runs in float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


_TORCH64 = _Float64Torch("torch")


def diffusers_twins(ours, n=None, timesteps=None):
    """(float32 diffusers, float64 diffusers on fastdiff's float64 sigma grid), both with timesteps set."""
    cfg = ours.to_diffusers_config()
    cfg.pop("_class_name")
    d32 = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    d64 = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    d32.set_timesteps(n, timesteps=timesteps)
    d64.set_timesteps(n, timesteps=timesteps)
    d64.sigmas = ours.sigmas.clone()
    return d32, d64


def diffusers_step(d, m, t, x, noise, float64):
    if not float64:
        return d.step(m, t, x, variance_noise=noise).prev_sample
    with mock.patch.object(dpm_module, "torch", _TORCH64):
        return d.step(m.double(), t, x.double(), variance_noise=noise.double()).prev_sample


def dummy_nonlinear_model(x, t, T=1000):
    """An analytic stand-in for a UNet: nonlinear in x, depends on t, output of order 1."""
    return 0.7 * torch.sin(3.0 * x) + 0.3 * x * (t / T) - 0.1


def magnitude_bound(ours, i, x, m, noise, ref64) -> float:
    """Relative error float32 arithmetic may honestly make on step i: 8 ulp of the sum of the terms' magnitudes
    (the table folds the divided differences into per-output coefficients, which can be large and cancel)."""
    row = ours.coeffs[i].double().abs()
    hist = ours.history_for(x).double().abs()
    k = hist.shape[0]
    x0 = row[0] * x.double().abs() + row[1] * m.double().abs()
    d = row[2] * x.double().abs() + row[3] * m.double().abs() + row[4] * x0
    mag = row[5] * x.double().abs() + row[6] * d + row[7] * hist[(i - 1) % k] + row[8] * hist[(i - 2) % k] \
        + row[9] * noise.double().abs()
    return 8 * 2.0**-24 * (mag.norm().item() + x0.norm().item()) / max(ref64.norm().item(), 1e-30)


def check_chain(config, n, seed, shape=SHAPE, model=dummy_nonlinear_model):
    ours = Ours(**config)
    ours.set_timesteps(n)
    d32, d64 = diffusers_twins(ours, n)
    assert ours.timesteps.tolist() == [t for t in d32.timesteps.tolist() if t >= 0]
    if ours.index_for_timestep(ours._timesteps[0]) != 0:
        # a repeated first timestep (cosine with karras / exponential / beta sigmas) maps to its second position
        # (diffusers' img2img rule), which would skip step 0 and run past the end: start explicitly at 0
        assert ours.index_for_timestep(ours._timesteps[0]) == d32.index_for_timestep(d32.timesteps[0]) == 1
        for s in (ours, d32, d64):
            s.set_begin_index(0)
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(shape, generator=gen)
    for i, t in enumerate(ours.timesteps.tolist()):
        m = model(x, t)
        noise = torch.randn(shape, generator=gen)
        ref64 = diffusers_step(d64, m, t, x, noise, True)
        ref32 = diffusers_step(d32, m, t, x, noise, False)
        bound = magnitude_bound(ours, i, x, m, noise, ref64)  # before step() overwrites the history slot
        out = ours.step(m, t, x, variance_noise=noise).prev_sample
        assert out.dtype == x.dtype and out.shape == x.shape
        assert_close(out, ref64, rtol=max(EXACT_RTOL, bound), what=f"step {i} (t={t}) vs float64 diffusers")
        own_error = relative_error(ref32, ref64)
        assert_close(out, ref32, rtol=RTOL[torch.float32] + own_error, what=f"step {i} (t={t}) vs diffusers")
        x = out


SOLVERS = [("dpmsolver++", 1), ("dpmsolver++", 2), ("dpmsolver++", 3), ("sde-dpmsolver++", 1),
           ("sde-dpmsolver++", 2), ("sde-dpmsolver++", 3), ("dpmsolver", 2), ("dpmsolver", 3), ("sde-dpmsolver", 2)]


@pytest.mark.parametrize(*product_cases({
    "solver": SOLVERS,
    "solver_type": ["midpoint", "heun"],
    "prediction": ["epsilon", "sample", "v_prediction"],
    "final": ["zero", "sigma_min"],
    "n": [7, 20],
}, quick_every=7))
def test_steps_match_diffusers(solver, solver_type, prediction, final, n):
    algorithm, order = solver
    if final == "zero" and not algorithm.endswith("++"):
        final = "sigma_min"  # diffusers rejects zero there
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, prediction_type=prediction,
                  final_sigmas_type=final)
    check_chain(config, n, seed=n + order)


@pytest.mark.parametrize(*product_cases({
    "sigmas": ["plain", "karras", "lu", "exponential", "beta"],
    "schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "spacing": ["linspace", "leading", "trailing"],
    "flags": ["default", "lower_order_final_off", "euler_at_final", "offset", "zero_snr_v", "clipped"],
}, quick_every=9))
def test_grids_and_flags_match_diffusers(sigmas, schedule, spacing, flags):
    config = {"beta_schedule": schedule, "timestep_spacing": spacing, "solver_order": 3}
    if schedule == "scaled_linear":
        config.update(beta_start=0.00085, beta_end=0.012)
    if sigmas != "plain":
        config[f"use_{sigmas}_sigmas" if sigmas != "lu" else "use_lu_lambdas"] = True
    config.update({
        "default": {},
        "lower_order_final_off": {"lower_order_final": False},
        "euler_at_final": {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        "offset": {"steps_offset": 1},
        "zero_snr_v": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        "clipped": {"lambda_min_clipped": -5.1},
    }[flags])
    check_chain(config, 10, seed=3)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_thresholding_matches_diffusers(algorithm, prediction):
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
    config = dict(algorithm_type=algorithm, prediction_type=prediction, thresholding=True,
                  dynamic_thresholding_ratio=0.9, sample_max_value=1.5, solver_order=3, final_sigmas_type=final)
    check_chain(config, 8, seed=5, model=lambda x, t: 2.5 * dummy_nonlinear_model(x, t))


def test_learned_variance_output_is_split():
    config = dict(variance_type="learned_range")
    ours = Ours(**config)
    ours.set_timesteps(5)
    d32, _ = diffusers_twins(ours, 5)
    x = torch.randn(2, 3, 4, 4)
    for t in ours.timesteps.tolist():
        m = torch.cat([dummy_nonlinear_model(x, t), torch.randn(2, 3, 4, 4)], dim=1)
        out = ours.step(m, t, x).prev_sample
        assert_close(out, d32.step(m, t, x).prev_sample, rtol=1e-5)
        x = out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 15, 25, 61, 103, 999])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_sigma_grid_matches_diffusers(spacing, n):
    """Timesteps equal diffusers' (negative trailing ones dropped). Sigmas: on the training grid (plain) they equal
    diffusers' run on float64 alphas_cumprod up to its final float32 rounding; karras / lu grids take their ends from
    diffusers' float32 training sigmas, as diffusers does, so they equal stock diffusers up to that rounding."""
    for extra in ({}, {"use_karras_sigmas": True}, {"use_lu_lambdas": True}, {"use_exponential_sigmas": True}):
        ours = Ours(timestep_spacing=spacing, **extra)
        ours.set_timesteps(n)
        ref = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, **extra)
        ref.set_timesteps(n)
        keep = ref.timesteps >= 0
        assert ours.timesteps.tolist() == ref.timesteps[keep].tolist(), extra
        ref_sigmas = torch.cat([ref.sigmas[:-1][keep], ref.sigmas[-1:]])
        assert_close(ours.sigmas, ref_sigmas, rtol=1e-7 if extra else 3e-6, what=f"sigmas {extra}")
        if not extra:
            ref.alphas_cumprod = ours.alphas_cumprod.clone()
            ref.set_timesteps(n)
            ref_sigmas = torch.cat([ref.sigmas[:-1][keep], ref.sigmas[-1:]])
            assert_close(ours.sigmas, ref_sigmas, rtol=1e-7, what="sigmas (float64 alphas)")


def test_generator_noise_matches_diffusers():
    """SDE noise drawn from ``generator`` as diffusers draws it: same generator seed, same chain."""
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
    ours = Ours(**config)
    ref = diffusers.DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in ours.timesteps:
        x = ours.step(dummy_nonlinear_model(x, t.item()), t, x, generator=g1).prev_sample
        y = ref.step(dummy_nonlinear_model(y, t.item()), t, y, generator=g2).prev_sample
        assert_close(x, y, rtol=1e-4, what=f"t={t.item()}")
    gens = [torch.Generator().manual_seed(k) for k in range(SHAPE[0])]
    gens_ref = [torch.Generator().manual_seed(k) for k in range(SHAPE[0])]
    ours.set_timesteps(3)
    ref.set_timesteps(3)
    t = ours.timesteps[0]
    a = ours.step(x, t, x, generator=gens).prev_sample
    b = ref.step(x, t, x, generator=gens_ref).prev_sample
    # t = 999: x0 = (x - sigma eps) / alpha with alpha = 6e-3 cancels; diffusers' float32 arithmetic errs ~3e-5 there
    assert_close(a, b, rtol=1e-4, what="per-sample generators")


def test_add_noise_matches_diffusers():
    for extra in ({}, {"use_karras_sigmas": True}):
        ours = Ours(**extra)
        ref = diffusers.DPMSolverMultistepScheduler(**extra)
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        ts = torch.tensor([ours.timesteps[2].item(), ours.timesteps[0].item(), 12345 % 997, ours.timesteps[9].item()])
        assert_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), rtol=1e-5, what=str(extra))
        exact = ours.add_noise(x0.double(), noise.double(), ts)
        assert exact.dtype == torch.float64
        assert_close(ours.add_noise(x0, noise, ts), exact, rtol=1e-6, what="float32 vs float64 tables")
        ours.set_begin_index(3)
        ref.set_begin_index(3)
        assert_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), rtol=1e-5, what="begin index")


def test_begin_index_matches_diffusers():
    """img2img: stepping starts at index 4 with first-order warm-up there, as diffusers' set_begin_index."""
    ours, ref = Ours(solver_order=3), diffusers.DPMSolverMultistepScheduler(solver_order=3)
    for s in (ours, ref):
        s.set_timesteps(12)
        s.set_begin_index(4)
    x = y = torch.randn(SHAPE)
    assert [ours.step_order(i, 4) for i in range(4, 12)] == [1, 2, 3, 3, 3, 3, 2, 1]
    for t in ours.timesteps[4:]:
        x = ours.step(dummy_nonlinear_model(x, t.item()), t, x).prev_sample
        y = ref.step(dummy_nonlinear_model(y, t.item()), t, y).prev_sample
        assert_close(x, y, rtol=2e-5)


# ----------------------------------------------------------------------------------------------------
# The device table, step_at, the history ring, seeds
# ----------------------------------------------------------------------------------------------------


def test_table_orders_and_buffers():
    s = Ours(solver_order=3, lower_order_final=True)
    s.set_timesteps(8)
    assert s.coeffs.shape == (8, ops.N_DPM_COEFFS) and s.coeffs.dtype == torch.float32
    assert [s.step_order(i) for i in range(8)] == [1, 2, 3, 3, 3, 3, 2, 1]
    d1, d2 = ops.DPM_COEFFS.index("prev_from_d1"), ops.DPM_COEFFS.index("prev_from_d2")
    orders = [1 + int(row[d1] != 0) + int(row[d2] != 0) for row in s.coeffs.tolist()]
    assert orders == [1, 2, 3, 3, 3, 3, 2, 1]
    assert not s.needs_noise and len(s) == 1000 and s.order == 1
    sde = Ours(algorithm_type="sde-dpmsolver++")
    sde.set_timesteps(5)
    assert sde.needs_noise and sde.noise_streams.tolist() == [ops.step_stream(t) for t in sde.timesteps.tolist()]
    many = Ours()
    many.set_timesteps(1000)  # repeated timesteps get distinct noise streams
    assert len(set(many.noise_streams.tolist())) == 1000


def test_step_at_equals_step_and_history_ring():
    s = Ours(solver_order=3, algorithm_type="sde-dpmsolver++")
    twin = Ours(solver_order=3, algorithm_type="sde-dpmsolver++")
    s.set_timesteps(6)
    twin.set_timesteps(6)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(SHAPE, generator=gen)
    seeds = torch.tensor([11, 2**40 + 3], dtype=torch.int64)
    for i, t in enumerate(s.timesteps.tolist()):
        m = dummy_nonlinear_model(x, t)
        a = s.step_at(m, torch.tensor(i), x, seeds=seeds)
        b = twin.step(m, t, x, seeds=seeds).prev_sample
        assert torch.equal(a, b)
        hist = s.history_for(x)
        x0 = (x - s.step_sigmas[i].double() * m) / s.step_alphas[i].double()
        assert_close(hist[i % 3], x0, rtol=1e-6, what="history slot holds this step's x0")
        x = a


def test_step_at_reads_nothing_from_the_device():
    """On the meta device any host read raises, so this proves step_at never syncs (warm-up order included)."""
    for config in ({"solver_order": 3}, {"algorithm_type": "sde-dpmsolver++"}):
        s = Ours(**config)
        s.set_timesteps(5, device="meta")
        x = torch.empty(SHAPE, device="meta")
        seeds = torch.zeros(SHAPE[0], dtype=torch.int64, device="meta")
        index = torch.zeros((), dtype=torch.int64, device="meta")
        for _ in range(5):
            out = s.step_at(x, index, x, seeds=seeds)
            assert out.device.type == "meta" and out.shape == x.shape
            index.add_(1)
        out = s.add_noise(x, x, s.timesteps[:1].expand(2))
        assert out.device.type == "meta"


def test_seeded_noise_independent_of_batch():
    s = Ours(algorithm_type="sde-dpmsolver++", solver_order=1)
    s.set_timesteps(4)
    x = torch.randn(5, 3, 4, 5)
    seeds = torch.tensor([3, 1, 4, 1 << 50, 9], dtype=torch.int64)
    m = dummy_nonlinear_model(x, 500)
    full = s.step_at(m, 1, x, seeds=seeds)
    for lo, hi in ((0, 1), (1, 4), (3, 5)):
        assert torch.equal(s.step_at(m[lo:hi], 1, x[lo:hi], seeds=seeds[lo:hi]), full[lo:hi])
    deterministic = s.step_at(m, 1, x, noise=torch.zeros_like(x))
    z = gaussian_noise_reference(seeds, s.noise_streams[1].item(), x.shape[1:])
    std = s.coeffs[1, ops.DPM_COEFFS.index("noise_std")]
    assert std > 0
    assert_close(full - deterministic, std * z, rtol=1e-5, what="seeded noise")


def test_stale_history_never_leaks():
    """A lower-order step ignores its unused history slots, even when they hold inf or NaN."""
    s = Ours(solver_order=3)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    m = dummy_nonlinear_model(x, 500)
    clean = s.step_at(m, 0, x)
    s.history_for(x).fill_(float("nan"))
    assert torch.equal(s.step_at(m, 0, x), clean)


def test_registry_and_configs():
    assert SCHEDULERS["dpmsolver++"] is Ours
    s = make_scheduler("dpmsolver++", solver_order=3)
    cfg = s.to_diffusers_config()
    assert cfg["_class_name"] == "DPMSolverMultistepScheduler"
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    again = scheduler_from_diffusers_config(cfg)
    assert isinstance(again, Ours) and public(again.config) == public(s.config)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    assert public(Ours.from_config(ref.config).config) == public(s.config)
    assert public(ref.config) == public(s.config)  # diffusers reads fastdiff's config back unchanged
    default = dict(diffusers.DPMSolverMultistepScheduler().config)
    ours = Ours().to_diffusers_config()
    for key, value in ours.items():
        if key in default and key != "_class_name":
            assert default[key] == value or (isinstance(value, float) and math.isinf(value)), key


@pytest.mark.parametrize("config,message", [
    ({"solver_order": 4}, "solver_order"),
    ({"algorithm_type": "euler"}, "algorithm_type"),
    ({"solver_type": "rk4"}, "solver_type"),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "zero"}, "final_sigmas_type 'zero'"),
    ({"algorithm_type": "sde-dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}, "third-order"),
    ({"use_karras_sigmas": True, "use_lu_lambdas": True}, "only one"),
    ({"use_flow_sigmas": True}, "flow"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"final_sigmas_type": "max"}, "final_sigmas_type"),
    ({"thresholding": True, "sample_max_value": float("nan")}, "sample_max_value"),
    ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
])
def test_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        Ours(**config)


def test_bad_calls():
    s = Ours()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 10, x)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(5, timesteps=[900, 500])
    with pytest.raises(ValueError, match="positive integer"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="exceeds"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.set_timesteps(timesteps=[1200, 10])
    with pytest.raises(ValueError, match="eta"):
        s.set_timesteps(5, eta=0.5)
    with pytest.raises(ValueError, match="karras"):
        Ours(use_karras_sigmas=True).set_timesteps(timesteps=[900, 10])
    s.set_timesteps(2)
    s.step(x, s.timesteps[0], x)
    s.step(x, s.timesteps[1], x)
    with pytest.raises(ValueError, match="past the last"):
        s.step(x, s.timesteps[1], x)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(2)
    sde = Ours(algorithm_type="sde-dpmsolver++")
    sde.set_timesteps(3)
    with pytest.raises(ValueError, match="pass noise= or seeds="):
        sde.step_at(x, 0, x)
    with pytest.raises(ValueError, match="history"):
        ops.dpm_solver_step(x, x, torch.zeros(4, *SHAPE), sde.coeffs, 0)
    with pytest.raises(ValueError, match="coeffs"):
        ops.dpm_solver_step(x, x, torch.zeros(2, *SHAPE), torch.zeros(3, 9), 0)


def test_reference_threshold_and_slots():
    x0 = torch.tensor([[[[3.0, -0.5, 0.2, 1.5]]], [[[0.1, 0.2, -0.3, 0.4]]]])
    out = dpm_reference.dynamic_threshold(x0, 1.0, 2.0)  # s = clamp(max |x0|, 1, 2): 2 and 1
    assert torch.allclose(out[0], torch.tensor([[[1.0, -0.25, 0.1, 0.75]]]))
    assert torch.equal(out[1], x0[1])
    assert dpm_reference.history_slots(4, 3, "cpu").tolist() == [1, 0, 2]
    assert dpm_reference.history_slots(torch.tensor(0), 2, "cpu").tolist() == [0, 1, 0]


# ----------------------------------------------------------------------------------------------------
# The sampler (eager, what a CUDA graph captures), image-to-image, the CLI
# ----------------------------------------------------------------------------------------------------


def _tiny_model():
    from fastdiff.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig.classic(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1, image_channels=1,
                                image_size=8, norm_num_groups=4)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("algorithm,order", [("dpmsolver++", 3), ("sde-dpmsolver++", 2)])
def test_sampler_equals_a_diffusers_loop(algorithm, order):
    """Sampler (device step counter, step_at, history ring) == diffusers' scheduler stepping the same model with
    the same starting noise and, for the SDE variant, the same Philox noise handed in as variance_noise."""
    from fastdiff.sampling import Sampler, image_seeds

    model = _tiny_model()
    ours = Ours(num_train_timesteps=100, algorithm_type=algorithm, solver_order=order)
    sampler = Sampler(model, ours, backend="reference")
    seeds = image_seeds(3, range(3))
    out = sampler.sample(seeds, steps=6)
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100, algorithm_type=algorithm, solver_order=order)
    ref.set_timesteps(6)
    x = ops.gaussian_noise(seeds, ops.INITIAL_NOISE_STREAM, (1, 8, 8), backend="reference")
    plan = sampler.plan(6)
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            m = model(x, t)
            z = gaussian_noise_reference(seeds, plan.scheduler.noise_streams[i].item(), x.shape[1:])
            x = ref.step(m, t, x, variance_noise=z).prev_sample
    assert_close(out, x, rtol=2e-5, what=f"{algorithm} sampler vs diffusers loop")


def test_sampler_img2img_uses_begin_index():
    from fastdiff.sampling import Sampler, image_seeds

    model = _tiny_model()
    sampler = Sampler(model, Ours(num_train_timesteps=100, solver_order=3), backend="reference")
    seeds = image_seeds(1, range(2))
    init = torch.rand(1, 1, 8, 8) * 2 - 1
    out = sampler.sample(seeds, steps=8, init=init, strength=0.5)
    plan = sampler.plan(8)
    assert plan.scheduler.begin_index == 4
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100, solver_order=3)
    ref.set_timesteps(8)
    ref.set_begin_index(4)
    noise = ops.gaussian_noise(seeds, ops.INITIAL_NOISE_STREAM, (1, 8, 8), backend="reference")
    x = ref.add_noise(init.expand(2, 1, 8, 8), noise, ref.timesteps[4:5].expand(2))
    with torch.no_grad():
        for t in ref.timesteps[4:]:
            x = ref.step(model(x, t), t, x).prev_sample
    assert_close(out, x, rtol=2e-5, what="img2img")
    again = sampler.sample(seeds, steps=8)  # a plain run afterwards starts its warm-up at step 0 again
    assert plan.scheduler.begin_index == 0 and torch.isfinite(again).all()


def test_cli_sample_dpm(tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "dpm"
    rc = main(["sample", "--scheduler", "dpmsolver++", "--steps", "4", "--solver-order", "3", "--karras",
               "--num-images", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "000000.png").is_file() and (out / "grid.png").is_file()
    assert "dpmsolver++ 4 steps" in capsys.readouterr().err
    for bad, message in ((["--scheduler", "ddim", "--karras"], "--solver-order and --karras"),
                         (["--scheduler", "dpmsolver++", "--eta", "0.5"], "--eta applies"),
                         (["--scheduler", "dpmsolver++", "--solver-order", "4"], "invalid choice")):
        try:
            rc = main(["sample", "--out", str(tmp_path / "x"), "--num-images", "1"] + bad)
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
        assert rc == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_bench_dpm_step_quick(tmp_path):
    """bench/dpm_step.py on the CPU: diffusers' own step agrees with fastdiff's reference on the timed inputs, the
    fused kernel is reported as not run (no CUDA), never invented."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import dpm_step

    assert dpm_step.main(["--quick", "--device", "cpu", "--no-compile", "--target-time", "0.01",
                          "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "dpm_step.json").read_text())
    case = report["cases"][0]
    assert case["bytes_per_element"] == 20 and case["floor_bytes"] == 5 * 4 * 8 * 3 * 32 * 32
    impls = case["impls"]
    assert impls["diffusers"]["status"] == "ok" and impls["diffusers"]["within_tolerance"]
    assert impls["fastdiff"]["status"] == "not run" and "gbps" not in impls["fastdiff"]
    assert "n/m" in (tmp_path / "dpm_step.md").read_text()


HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item"}


@pytest.mark.parametrize("config", [{"solver_order": 3}, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                                    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "prediction_type": "v_prediction"}])
def test_step_at_guard_no_host_read_ops(config):
    """Every aten op of a run of step_at (device step index, Philox seeds), warm-up and final steps included, is
    recorded: none reads a value back to the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    s = Ours(**config)
    s.set_timesteps(6)
    x = torch.randn(SHAPE)
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    index = torch.zeros((), dtype=torch.int64)
    with Record() as rec:
        for _ in range(6):
            x = s.step_at(dummy_nonlinear_model(x, 500), index, x, seeds=seeds)
            index.add_(1)
    assert rec.names and not (rec.names & HOST_READS), sorted(rec.names & HOST_READS)
    assert torch.isfinite(x).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_step_at_in_cuda_graph(backend):
    """Capture step_at (order 3, SDE, Philox) once; each replay equals the eager chain and the CPU reference."""
    dev = torch.device("cuda")
    config = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    s, cpu = Ours(**config, backend=backend), Ours(**config, backend="reference")
    s.set_timesteps(6, device=dev)
    cpu.set_timesteps(6)
    x_cpu = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    seeds = torch.tensor([3, 4], dtype=torch.int64, device=dev)
    x = torch.empty(SHAPE, device=dev)
    index = torch.zeros((), dtype=torch.int64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.copy_(x_cpu.to(dev))
            x.copy_(s.step_at(dummy_nonlinear_model(x, 500), index, x, seeds=seeds))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(s.step_at(dummy_nonlinear_model(x, 500), index, x, seeds=seeds))
        index.add_(1)
    for _ in range(2):
        index.zero_()
        x.copy_(x_cpu.to(dev))
        ref = x_cpu.clone()
        for i in range(6):
            graph.replay()
            ref = cpu.step_at(dummy_nonlinear_model(ref, 500), i, ref, seeds=seeds.cpu())
            assert_close(x, ref, rtol=2e-5, what=f"replay step {i} vs CPU reference")


def test_drop_in_for_a_diffusers_pipeline():
    """``pipe.scheduler = fastdiff.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``: the same images
    as diffusers' own scheduler, SDE noise from the pipeline's generator included."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with torch.no_grad():  # perturb the zero-initialised output layers so the images depend on the network
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", solver_order=3))
    pipe.set_progress_bar_config(disable=True)
    call = dict(batch_size=2, num_inference_steps=6, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(3), **call).images
    pipe.scheduler = Ours.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, Ours) and pipe.scheduler.config.solver_order == 3
    out = pipe(generator=torch.Generator().manual_seed(3), **call).images
    assert np.abs(out - ref).max() < 1e-4


def test_beta_sigmas_without_scipy_is_a_clear_error():
    """scipy is optional: without it, use_beta_sigmas fails at construction with what to install."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "scipy" else real_find_spec(name, *args)

    with mock.patch("importlib.util.find_spec", find_spec):
        with pytest.raises(ImportError, match="use_beta_sigmas needs scipy"):
            DPMSolverMultistepScheduler(use_beta_sigmas=True)
        DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(5)  # the other grids need no scipy
