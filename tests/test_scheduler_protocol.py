"""fastdiff.DDPMScheduler / DDIMScheduler under diffusers' scheduler protocol, tested with diffusers' own tests.

The loops of diffusers' tests/schedulers/test_scheduler_ddpm.py, test_scheduler_ddim.py and the shared
SchedulerCommonTest (diffusers 0.42.1) are written again here with fastdiff's classes in place of diffusers',
their golden numbers and tolerances unchanged. On precision: fastdiff computes its coefficients in float64, diffusers
in float32. Where diffusers' float32 rounding moves a golden beyond its own tolerance (DDPM
test_full_loop_with_noise: fastdiff 387.967, golden 387.947, tolerance 0.01), the test shows instead that fastdiff
equals diffusers' algorithm run in float64 (its tables and tensors upcast), within that same tolerance.
Then: config and constructor rules, noise drawn from generators as diffusers draws it, and fastdiff's schedulers
inside unmodified DDPMPipeline / DDIMPipeline objects.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import pickle
from unittest import mock

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor  # noqa: E402

from fastdiff import DDIMScheduler, DDPMScheduler, ops  # noqa: E402
from fastdiff.randn import randn_tensor  # noqa: E402
from fastdiff.schedulers import SchedulerConfig, SchedulerOutput  # noqa: E402
from fastdiff.testing import RTOL, assert_close, relative_error  # noqa: E402

OURS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
NOISE_STD = ops.STEP_COEFFS.index("noise_std")


# ----------------------------------------------------------------------------------------------------
# diffusers' test fixtures (SchedulerCommonTest), written again
# ----------------------------------------------------------------------------------------------------


def dummy_sample() -> torch.Tensor:
    return torch.rand((4, 3, 8, 8))


def _arange_sample(flip: bool) -> torch.Tensor:
    n = 4 * 3 * 8 * 8
    values = torch.arange(n)
    if flip:
        values = values.flip(-1)
    return (values.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_sample_deter() -> torch.Tensor:
    return _arange_sample(flip=False)


def dummy_noise_deter() -> torch.Tensor:
    return _arange_sample(flip=True)


def dummy_model(sample, t):
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.dim() - 1)).to(sample.device, dtype=sample.dtype)
    return sample * t / (t + 1)


def ddpm_config(**kwargs) -> dict:
    return {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "variance_type": "fixed_small", "clip_sample": True, **kwargs}


def ddim_config(**kwargs) -> dict:
    return {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "clip_sample": True, **kwargs}


# ----------------------------------------------------------------------------------------------------
# The full loops and their golden numbers
# ----------------------------------------------------------------------------------------------------


def ddpm_full_loop(cls, with_noise=False, **config):
    """diffusers' DDPM test_full_loop_no_noise / _with_v_prediction / _with_noise: no set_timesteps."""
    scheduler = cls(**ddpm_config(**config))
    sample = dummy_sample_deter()
    generator = torch.manual_seed(0)
    if with_noise:
        t_start = len(scheduler) - 2
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        sample = scheduler.add_noise(sample, dummy_noise_deter(), timesteps[:1])
    else:
        timesteps = reversed(range(len(scheduler)))
    for t in timesteps:
        residual = dummy_model(sample, t)
        sample = scheduler.step(residual, t, sample, generator=generator).prev_sample
    return sample


def ddim_full_loop(cls, with_noise=False, **config):
    """diffusers' DDIM full_loop (10 steps, eta passed positionally) and test_full_loop_with_noise."""
    scheduler = cls(**ddim_config(**config))
    num_inference_steps, eta = 10, 0.0
    sample = dummy_sample_deter()
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    if with_noise:
        t_start = 8
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        sample = scheduler.add_noise(sample, dummy_noise_deter(), timesteps[:1])
    for t in timesteps:
        residual = dummy_model(sample, t)
        sample = scheduler.step(residual, t, sample, eta).prev_sample
    return sample


# name: (loop, config, golden sum, golden mean) from diffusers' tests; tolerances there: 1e-2 (sum), 1e-3 (mean)
GOLDENS = {
    "ddpm_no_noise": (ddpm_full_loop, {}, 258.9606, 0.3372),
    "ddpm_v_prediction": (ddpm_full_loop, {"prediction_type": "v_prediction"}, 202.0296, 0.2631),
    "ddpm_with_noise": (ddpm_full_loop, {"with_noise": True}, 387.9466, 0.5051),
    "ddim_no_noise": (ddim_full_loop, {}, 172.0067, 0.223967),
    "ddim_v_prediction": (ddim_full_loop, {"prediction_type": "v_prediction"}, 52.5302, 0.0684),
    "ddim_set_alpha_to_one": (ddim_full_loop, {"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
    "ddim_no_set_alpha_to_one": (ddim_full_loop, {"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
    "ddim_with_noise": (ddim_full_loop, {"with_noise": True}, 354.5418, 0.4616),
}
SUM_TOL, MEAN_TOL = 1e-2, 1e-3
# Goldens that diffusers' float32 coefficients move beyond their own tolerance. DDPM with noise runs t = 1 -> 0
# (a single noisy step), where 1 - alpha-bar_t = 2.2e-4 is computed by diffusers in float32 from alpha-bar_t =
# 0.99978 (ulp 6e-8): a relative error of 1.5e-4 in beta_prod_t, which moves the sum by 0.02.
FLOAT32_GOLDENS = {"ddpm_with_noise"}


class _Float64Diffusers:
    """diffusers' scheduler class with its tables replaced by fastdiff's float64 ones: diffusers' algorithm in float64.

    Its noise is drawn in float32 from the same generator and upcast, so both runs see the same numbers.
    """

    def __init__(self, diffusers_cls):
        self.cls = diffusers_cls

    def __call__(self, **config):
        d = self.cls(**config)
        ours = OURS[self.cls.__name__](**config)
        d.alphas_cumprod = ours.alphas_cumprod.clone()
        d.one = torch.tensor(1.0, dtype=torch.float64)
        if isinstance(d, diffusers.DDIMScheduler):
            d.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
        return d

    def __getattr__(self, name):
        return getattr(self.cls, name)


def _float32_noise_upcast(shape, generator=None, device=None, dtype=None, layout=None):
    return diffusers_randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def float32_noise():
    """Within: diffusers' schedulers draw their noise in float32 and upcast it (a float64 run sees the same noise)."""
    return mock.patch.multiple(scheduling_ddpm, randn_tensor=_float32_noise_upcast), \
        mock.patch.multiple(scheduling_ddim, randn_tensor=_float32_noise_upcast)


def assert_step_matches_diffusers(out, ref32, ref64, what):
    """fastdiff's step output vs diffusers' float32 output, allowing diffusers' own float32 error (its distance to
    the float64 run of the same step); and vs the float64 run within float32 tolerance."""
    for field in ("prev_sample", "pred_original_sample"):
        res, r32, r64 = getattr(out, field), getattr(ref32, field), getattr(ref64, field)
        assert_close(res, r64, rtol=RTOL[torch.float32], what=f"{what} {field} vs float64 diffusers")
        assert_close(res, r32, rtol=RTOL[torch.float32] + relative_error(r32, r64), what=f"{what} {field} vs diffusers")


def run_diffusers_float64(loop, config):
    """The same loop with diffusers' scheduler in float64 (float64 tables, sample, model output and arithmetic)."""
    cls = diffusers.DDPMScheduler if loop is ddpm_full_loop else diffusers.DDIMScheduler
    with mock.patch.object(scheduling_ddpm, "randn_tensor", _float32_noise_upcast), \
            mock.patch.object(scheduling_ddim, "randn_tensor", _float32_noise_upcast), \
            mock.patch(f"{__name__}.dummy_sample_deter", lambda: _arange_sample(False).double()), \
            mock.patch(f"{__name__}.dummy_noise_deter", lambda: _arange_sample(True).double()):
        return loop(_Float64Diffusers(cls), **config)


@pytest.mark.parametrize("name", list(GOLDENS))
def test_diffusers_full_loop_goldens(name):
    loop, config, golden_sum, golden_mean = GOLDENS[name]
    sample = loop(OURS["DDPMScheduler" if loop is ddpm_full_loop else "DDIMScheduler"], **config)
    result_sum, result_mean = torch.sum(torch.abs(sample)).item(), torch.mean(torch.abs(sample)).item()
    reference = run_diffusers_float64(loop, config)
    ref_sum, ref_mean = torch.sum(torch.abs(reference)).item(), torch.mean(torch.abs(reference)).item()
    # fastdiff (float32 tensors, float64 coefficients) equals diffusers' algorithm in float64, to the golden tolerances
    assert abs(result_sum - ref_sum) < SUM_TOL, f"sum {result_sum} vs float64 diffusers {ref_sum}"
    assert abs(result_mean - ref_mean) < MEAN_TOL, f"mean {result_mean} vs float64 diffusers {ref_mean}"
    if name not in FLOAT32_GOLDENS:
        assert abs(result_sum - golden_sum) < SUM_TOL, f" expected result sum {golden_sum}, but get {result_sum}"
        assert abs(result_mean - golden_mean) < MEAN_TOL, f" expected result mean {golden_mean}, but get {result_mean}"
    else:
        # the golden is diffusers' float32 rounding: diffusers itself meets it in float32 and misses it in float64
        d32 = loop(diffusers.DDPMScheduler if loop is ddpm_full_loop else diffusers.DDIMScheduler, **config)
        assert abs(torch.sum(torch.abs(d32)).item() - golden_sum) < SUM_TOL
        assert abs(ref_sum - golden_sum) > SUM_TOL, "the float64 run meets the golden: move it out of FLOAT32_GOLDENS"


# ----------------------------------------------------------------------------------------------------
# check_over_configs / check_over_forward: save, load, step; and the same step as diffusers
# ----------------------------------------------------------------------------------------------------


def check_against_diffusers(cls, config, time_step, num_inference_steps=None, tmp_path=None, **step_kwargs):
    """diffusers' check: a scheduler and its save_config/from_pretrained copy step alike (sum |diff| < 1e-5);
    plus: fastdiff's step equals diffusers' scheduler of the same config, same generator (prev_sample and
    pred_original_sample)."""
    sample = dummy_sample()
    residual = 0.1 * sample
    ours = cls(**config)
    ours.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    ref = getattr(diffusers, cls.__name__)(**config)
    for s in (ours, loaded, ref):
        if num_inference_steps is not None:
            s.set_timesteps(num_inference_steps)
        _ = s.scale_model_input(sample, s.timesteps[-1])
    outputs = []
    for s in (ours, loaded, ref):
        outputs.append(s.step(residual, time_step, sample, generator=torch.manual_seed(0), **step_kwargs))
    out, again, expected = outputs
    assert torch.sum(torch.abs(out.prev_sample - again.prev_sample)) < 1e-5, "Scheduler outputs are not identical"
    for field in ("prev_sample", "pred_original_sample"):
        assert_close(getattr(out, field), getattr(expected, field), rtol=RTOL[torch.float32],
                     what=f"{field} vs diffusers at t={time_step}")


DDPM_CONFIGS = (
    [{"num_train_timesteps": n} for n in (1, 5, 100, 1000)]
    + [{"beta_start": a, "beta_end": b} for a, b in ((0.0001, 0.002), (0.001, 0.02), (0.01, 0.2))]
    + [{"beta_schedule": s} for s in ("linear", "squaredcos_cap_v2")]
    + [{"variance_type": v} for v in ("fixed_small", "fixed_large")]
    + [{"clip_sample": c} for c in (True, False)]
    + [{"thresholding": False}]
    + [{"prediction_type": p} for p in ("epsilon", "sample", "v_prediction")]
    + [{"rescale_betas_zero_snr": r} for r in (True, False)]
)
DDIM_CONFIGS = (
    [{"num_train_timesteps": n} for n in (100, 500, 1000)]
    + [{"steps_offset": o} for o in (0, 1)]
    + [{"beta_start": a, "beta_end": b} for a, b in ((0.0001, 0.002), (0.001, 0.02), (0.01, 0.2))]
    + [{"beta_schedule": s} for s in ("linear", "squaredcos_cap_v2")]
    + [{"prediction_type": p} for p in ("epsilon", "v_prediction")]
    + [{"clip_sample": c} for c in (True, False)]
    + [{"timestep_spacing": s} for s in ("trailing", "leading")]
    + [{"rescale_betas_zero_snr": r} for r in (True, False)]
    + [{"thresholding": False}]
)


@pytest.mark.parametrize("config", DDPM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ddpm_over_configs(config, tmp_path):
    check_against_diffusers(DDPMScheduler, ddpm_config(**config), time_step=0, tmp_path=tmp_path)


@pytest.mark.parametrize("time_step", [0, 500, 999])
def test_ddpm_time_indices(time_step, tmp_path):
    check_against_diffusers(DDPMScheduler, ddpm_config(), time_step=time_step, tmp_path=tmp_path)


@pytest.mark.parametrize("config", DDIM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ddim_over_configs(config, tmp_path):
    check_against_diffusers(DDIMScheduler, ddim_config(**config), time_step=0, num_inference_steps=50, eta=0.0,
                            tmp_path=tmp_path)


@pytest.mark.parametrize("time_step,num_inference_steps,eta", [
    (1, 50, 0.0), (10, 50, 0.0), (49, 50, 0.0),  # test_time_indices: timesteps that are not on the grid
    (1, 10, 0.0), (10, 50, 0.0), (50, 500, 0.0),  # test_inference_steps
    (1, 50, 0.0), (10, 50, 0.5), (49, 50, 1.0),  # test_eta
    (980, 50, 1.0), (500, 50, 0.3)])  # on the grid, with noise
def test_ddim_over_forward(time_step, num_inference_steps, eta, tmp_path):
    check_against_diffusers(DDIMScheduler, ddim_config(), time_step=time_step,
                            num_inference_steps=num_inference_steps, eta=eta, tmp_path=tmp_path)


@pytest.mark.parametrize("cls,config,message", [
    (DDPMScheduler, ddpm_config(variance_type="other"), "variance_type 'other' is not supported"),
    (DDPMScheduler, ddpm_config(thresholding=True, sample_max_value=2.0), "thresholding=True"),
    (DDIMScheduler, ddim_config(thresholding=True, prediction_type="v_prediction"), "thresholding=True"),
    (DDPMScheduler, ddpm_config(beta_start=0.1, beta_end=2), r"betas must lie in \(0, 1\]"),
    (DDIMScheduler, ddim_config(beta_start=0.1, beta_end=2), r"betas must lie in \(0, 1\]"),
])
def test_configs_diffusers_accepts_but_fastdiff_refuses(cls, config, message):
    """Dynamic thresholding, unknown variance types and betas above 1 are refused with a clear error (diffusers'
    tests step these only at t = 0, where betas > 1 have no effect yet)."""
    with pytest.raises(ValueError, match=message):
        cls(**config)
    with pytest.raises(ValueError, match=message):
        cls.from_config(config)


def test_ddim_steps_offset_timesteps():
    scheduler = DDIMScheduler(**ddim_config(steps_offset=1))
    scheduler.set_timesteps(5)
    assert torch.equal(scheduler.timesteps, torch.LongTensor([801, 601, 401, 201, 1]))


def test_variance_goldens():
    """diffusers' test_variance numbers, read from fastdiff's coefficient table (noise_std^2 = the variance)."""
    ddpm = DDPMScheduler(**ddpm_config())
    for t, variance in ((0, 0.0), (487, 0.00979), (999, 0.02)):
        assert abs(ddpm.coeffs[ddpm.index_of(t), NOISE_STD].item() ** 2 - variance) < 1e-5, t
    ddim = DDIMScheduler(**ddim_config())
    for (t, prev_t), variance in (((420, 400), 0.14771), ((980, 960), 0.32460), ((487, 486), 0.00979),
                                  ((999, 998), 0.02)):
        ddim.set_timesteps(1000 // (t - prev_t), eta=1.0)
        assert abs(ddim.coeffs[ddim.index_of(t), NOISE_STD].item() ** 2 - variance) < 1e-5, (t, prev_t)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_shape_and_output_forms(cls):
    """test_step_shape and test_scheduler_outputs_equivalence: the dict output and the tuple agree."""
    kwargs = {"eta": 0.0} if cls is DDIMScheduler else {}
    scheduler = cls(**(ddim_config() if cls is DDIMScheduler else ddpm_config()))
    scheduler.set_timesteps(50)
    sample = dummy_sample()
    residual = 0.1 * sample
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    out0 = scheduler.step(residual, t0, sample, generator=torch.manual_seed(0), **kwargs)
    out1 = scheduler.step(residual, t1, sample, **kwargs).prev_sample
    assert out0.prev_sample.shape == sample.shape == out1.shape
    as_tuple = scheduler.step(residual, t0, sample, generator=torch.manual_seed(0), return_dict=False, **kwargs)
    assert isinstance(out0, SchedulerOutput) and isinstance(as_tuple, tuple) and len(as_tuple) == 2
    for a, b in zip(as_tuple, out0.values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert out0[0] is out0.prev_sample and out0["pred_original_sample"] is out0.pred_original_sample
    assert out0.keys() == ["prev_sample", "pred_original_sample"] and out0.to_tuple()[1] is out0[1]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_public_api(cls):
    """test_scheduler_public_api, plus len(), order and the attributes pipelines read."""
    scheduler = cls()
    assert hasattr(scheduler, "init_noise_sigma") and scheduler.init_noise_sigma == 1.0
    assert hasattr(scheduler, "scale_model_input") and hasattr(scheduler, "step") and hasattr(scheduler, "set_timesteps")
    sample = dummy_sample()
    assert scheduler.scale_model_input(sample, 5) is sample and scheduler.scale_model_input(sample) is sample
    assert len(scheduler) == 1000 and cls.order == scheduler.order == 1
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1)) and scheduler.timesteps.dtype == torch.int64
    assert scheduler.num_inference_steps is None
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config["prediction_type"] == "epsilon"
    ref = getattr(diffusers, cls.__name__)
    ours_params = list(inspect.signature(cls.__init__).parameters.items())
    ref_params = list(inspect.signature(ref.__init__).parameters.items())
    assert [(k, p.default) for k, p in ours_params[:len(ref_params)]] == [(k, p.default) for k, p in ref_params]
    step_ref = list(inspect.signature(ref.step).parameters.items())
    step_ours = list(inspect.signature(cls.step).parameters.items())
    assert [(k, p.default) for k, p in step_ours[:len(step_ref)]] == [(k, p.default) for k, p in step_ref]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for _, p in step_ours[len(step_ref):])


# ----------------------------------------------------------------------------------------------------
# Timesteps: without set_timesteps, custom timesteps, errors
# ----------------------------------------------------------------------------------------------------


def test_ddpm_steps_without_set_timesteps_like_diffusers():
    config = {"prediction_type": "v_prediction"}
    ours, ref = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    ref64 = _Float64Diffusers(diffusers.DDPMScheduler)(**config)
    sample = dummy_sample()
    for t in (999, 500, 1, 0):
        a = ours.step(0.1 * sample, t, sample, generator=torch.manual_seed(t))
        b = ref.step(0.1 * sample, t, sample, generator=torch.manual_seed(t))
        patch_ddpm, patch_ddim = float32_noise()
        with patch_ddpm, patch_ddim:
            c = ref64.step(0.1 * sample.double(), t, sample.double(), generator=torch.manual_seed(t))
        assert_step_matches_diffusers(a, b, c, f"t={t}")
    assert ours.num_inference_steps is None and len(ours.coeffs) == 1000


def test_ddpm_zero_snr_default_grid_refuses_only_the_impossible_step():
    """With rescaled betas alpha-bar_999 = 0: an epsilon model cannot give x0 there (diffusers returns NaN/inf);
    every other timestep steps as diffusers', and step_at asks for set_timesteps."""
    ours = DDPMScheduler(rescale_betas_zero_snr=True)
    ref = diffusers.DDPMScheduler(rescale_betas_zero_snr=True)
    sample = dummy_sample()
    assert_close(ours.step(0.1 * sample, 500, sample, generator=torch.manual_seed(0)).prev_sample,
                 ref.step(0.1 * sample, 500, sample, generator=torch.manual_seed(0)).prev_sample)
    with pytest.raises(ValueError, match="step at timestep 999: alphas_cumprod.* = 0"):
        ours.step(0.1 * sample, 999, sample)
    with pytest.raises(ValueError, match="timestep 999 of the every-timestep schedule cannot be stepped"):
        ours.step_at(sample, 0, sample, seeds=torch.zeros(4, dtype=torch.int64))


def test_ddim_needs_set_timesteps_like_diffusers():
    s = DDIMScheduler()
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.step(dummy_sample(), 0, dummy_sample())


def test_ddpm_custom_timesteps_match_diffusers():
    """test_custom_timesteps: stepping [100, 87, 50, 1, 0] goes to the next custom timestep (-1 after the last)."""
    timesteps = [100, 87, 50, 1, 0]
    ours, ref = DDPMScheduler(**ddpm_config()), diffusers.DDPMScheduler(**ddpm_config())
    ours.set_timesteps(timesteps=timesteps)
    ref.set_timesteps(timesteps=timesteps)
    assert ours.timesteps.tolist() == timesteps and ours.custom_timesteps
    assert [ref.previous_timestep(t).item() for t in ref.timesteps] == timesteps[1:] + [-1]
    assert [ours.previous_timestep(i) for i in range(len(timesteps))] == timesteps[1:] + [-1]
    ref64 = _Float64Diffusers(diffusers.DDPMScheduler)(**ddpm_config())
    ref64.set_timesteps(timesteps=timesteps)
    x = dummy_sample_deter()
    for t in timesteps:  # every step starts all three from fastdiff's previous output
        outputs = []
        for s, sample in ((ours, x), (ref, x), (ref64, x.double())):
            patch_ddpm, patch_ddim = float32_noise()
            with patch_ddpm, patch_ddim:
                outputs.append(s.step(dummy_model(sample, t), t, sample, generator=torch.manual_seed(t)))
        assert_step_matches_diffusers(*outputs, what=f"custom timestep {t}")
        x = outputs[0].prev_sample


@pytest.mark.parametrize("kwargs,message", [
    ({"timesteps": [100, 87, 50, 51, 0]}, "strictly descending"),
    ({"timesteps": [100, 87, 50, 1, 0], "num_inference_steps": 5}, "either num_inference_steps or timesteps"),
    ({"timesteps": [1000]}, r"must lie in \[0, 999\]"),
    ({"timesteps": [5, -1]}, r"must lie in \[0, 999\]"),
    ({"timesteps": []}, "empty"),
    ({"timesteps": [10.0, 5.0]}, "must be integers"),
    ({}, "num_inference_steps must be a positive integer, got None"),
])
def test_ddpm_custom_timesteps_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMScheduler().set_timesteps(**kwargs)


def test_ddim_refuses_custom_timesteps():
    with pytest.raises(ValueError, match="custom timesteps are not supported"):
        DDIMScheduler().set_timesteps(timesteps=[900, 500, 0])


def test_ddim_eta_positional_is_eta():
    """The fourth positional argument of DDIM's step is eta, as in diffusers (once fastdiff's noise)."""
    ours, ref = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    sample = dummy_sample()
    a = ours.step(0.1 * sample, 500, sample, 0.7, False, torch.manual_seed(3)).prev_sample
    b = ref.step(0.1 * sample, 500, sample, 0.7, False, torch.manual_seed(3)).prev_sample
    assert_close(a, b)
    noise = torch.randn(sample.shape)
    assert_close(ours.step(0.1 * sample, 500, sample, eta=0.7, variance_noise=noise).prev_sample,
                 ref.step(0.1 * sample, 500, sample, eta=0.7, variance_noise=noise).prev_sample)
    assert torch.equal(ours.step(0.1 * sample, 500, sample, eta=0.7, variance_noise=noise).prev_sample,
                       ours.step(0.1 * sample, 500, sample, eta=0.7, noise=noise).prev_sample)
    with pytest.raises(ValueError, match="only one of generator"):
        ours.step(0.1 * sample, 500, sample, 0.7, generator=torch.manual_seed(0), variance_noise=noise)
    with pytest.raises(ValueError, match="only one of generator"):
        ours.step(0.1 * sample, 500, sample, 0.7, seeds=torch.zeros(4, dtype=torch.int64), variance_noise=noise)
    with pytest.raises(ValueError, match="outside"):
        ours.step(0.1 * sample, 1000, sample)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_noise_draws_consume_the_generator_as_diffusers(cls):
    """The generator advances exactly as in diffusers: DDPM draws when t > 0, DDIM when eta > 0 (even at the last
    step, where sigma = 0)."""
    ours, ref = cls(), getattr(diffusers, cls.__name__)()
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    kwargs = {"eta": 1.0} if cls is DDIMScheduler else {}
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = y = dummy_sample()
    for t in ours.timesteps.tolist():
        x = ours.step(0.1 * x, t, x, generator=gen_a, **kwargs).prev_sample
        y = ref.step(0.1 * y, t, y, generator=gen_b, **kwargs).prev_sample
        assert torch.equal(gen_a.get_state(), gen_b.get_state()), t
    assert_close(x, y)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_add_noise_and_velocity_match_diffusers(cls):
    ours, ref = cls(beta_schedule="squaredcos_cap_v2"), getattr(diffusers, cls.__name__)(beta_schedule="squaredcos_cap_v2")
    x, noise = dummy_sample(), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert_close(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), what="add_noise")
    assert_close(ours.get_velocity(x, noise, t), ref.get_velocity(x, noise, t), what="get_velocity")
    x64, noise64 = x.double(), noise.double()
    exact = ours.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1) * x64 \
        + (1 - ours.alphas_cumprod[t]).sqrt().reshape(-1, 1, 1, 1) * noise64
    assert ours.add_noise(x64, noise64, t).dtype == torch.float64
    assert_close(ours.add_noise(x64, noise64, t), exact, rtol=1e-14, what="float64 add_noise")


# ----------------------------------------------------------------------------------------------------
# Configuration: construction, from_config, .config, save / load
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_construct_like_diffusers(cls):
    kwargs = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
              "prediction_type": "v_prediction", "clip_sample": False}
    ours = cls(**kwargs, _class_name=cls.__name__, _diffusers_version="0.42.1")  # private keys dropped, as diffusers
    ref = getattr(diffusers, cls.__name__)(**kwargs)
    assert dict(ours.config) == {k: v for k, v in ref.config.items() if not k.startswith("_")}
    positional = cls(500, 0.00085, 0.012, "scaled_linear")  # diffusers' positional order works too
    assert (positional.config.num_train_timesteps, positional.config.beta_schedule) == (500, "scaled_linear")
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        cls(no_such_option=1)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_config_loads_back_into_diffusers(cls):
    ours = cls(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="trailing",
               trained_betas=None, clip_sample_range=2.0)
    ref = getattr(diffusers, cls.__name__).from_config(ours.config)
    assert {k: ref.config[k] for k in ours.config} == dict(ours.config)
    again = cls.from_config(ref.config)  # a diffusers FrozenDict
    assert again.config == ours.config
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    trained = cls(num_train_timesteps=4, trained_betas=np.array([0.1, 0.2, 0.3, 0.4]))
    assert trained.config.trained_betas == [0.1, 0.2, 0.3, 0.4]
    assert torch.allclose(getattr(diffusers, cls.__name__).from_config(trained.config).betas,
                          torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_from_config_rules(caplog):
    """diffusers' from_config: kwargs override, sibling keys quiet, unknown keys warned about and kept in .config,
    _use_default_values honoured, return_unused_kwargs."""
    ddpm = DDPMScheduler(variance_type="fixed_large", prediction_type="v_prediction")
    with caplog.at_level(logging.WARNING, logger="fastdiff.schedulers"):
        ddim = DDIMScheduler.from_config(ddpm.config)
    assert not caplog.records
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.variance_type == "fixed_large"
    back = DDPMScheduler.from_config(ddim.config)  # the DDPM-only key survived the round trip through DDIM
    assert back.config.variance_type == "fixed_large" and {k: back.config[k] for k in ddpm.config} == dict(ddpm.config)
    with caplog.at_level(logging.WARNING, logger="fastdiff.schedulers"):
        s, unused = DDIMScheduler.from_config({"num_train_timesteps": 500, "skip_prk_steps": True, "_x": 1},
                                              return_unused_kwargs=True, steps_offset=1, extra_kwarg=3)
    assert "skip_prk_steps" in caplog.text and "not expected and will be ignored" in caplog.text
    assert s.config.num_train_timesteps == 500 and s.config.steps_offset == 1
    assert unused == {"skip_prk_steps": True, "extra_kwarg": 3, "_x": 1}
    assert s.config.skip_prk_steps is True
    defaults = DDIMScheduler.from_config({"prediction_type": "sample", "clip_sample": False,
                                          "_use_default_values": ["clip_sample"]})
    assert defaults.config.prediction_type == "sample" and defaults.config.clip_sample is True
    d = diffusers.DDPMScheduler()  # every value a default: diffusers lists them in _use_default_values
    assert DDIMScheduler.from_config(d.config).config.set_alpha_to_one is True
    with pytest.raises(TypeError, match="expects a config dict"):
        DDIMScheduler.from_config("google/ddpm-cifar10-32")
    with pytest.raises(ValueError, match="pass a config dict"):
        DDIMScheduler.from_config()


def test_config_is_read_only_and_copyable():
    s = DDIMScheduler()
    for mutate in (lambda c: c.__setitem__("eta", 1), lambda c: c.update(a=1), lambda c: c.pop("beta_end"),
                   lambda c: setattr(c, "beta_end", 1.0)):
        with pytest.raises(TypeError, match="read-only"):
            mutate(s.config)
    for clone in (copy.copy(s.config), copy.deepcopy(s.config), pickle.loads(pickle.dumps(s.config))):
        assert isinstance(clone, SchedulerConfig) and clone == s.config
    assert json.loads(json.dumps(s.config)) == dict(s.config)
    assert copy.deepcopy(s).config == s.config


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_save_and_load_folders(cls, tmp_path):
    ours = cls(prediction_type="v_prediction", timestep_spacing="linspace")
    ours.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__
    ref = getattr(diffusers, cls.__name__).from_pretrained(tmp_path, subfolder="scheduler")
    assert {k: ref.config[k] for k in ours.config} == dict(ours.config)
    ref.save_pretrained(tmp_path / "from_diffusers")
    loaded = cls.from_pretrained(tmp_path / "from_diffusers")
    assert {k: loaded.config[k] for k in ours.config} == dict(ours.config)
    again = cls.from_pretrained(tmp_path, subfolder="scheduler")
    # as in diffusers, the file's private keys (_class_name, the version) are kept in the loaded .config
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == dict(ours.config)
    assert again.config["_class_name"] == cls.__name__
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        cls.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        cls.from_pretrained(tmp_path / "bad")


# ----------------------------------------------------------------------------------------------------
# Noise from generators: diffusers' randn_tensor semantics
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_randn_tensor_matches_diffusers(dtype):
    shape = (3, 2, 5, 4)
    cases = {
        "one generator": lambda: torch.Generator().manual_seed(11),
        "list": lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)],
        "list of one": lambda: [torch.Generator().manual_seed(5)],
        "longer list": lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)],
    }
    for name, make in cases.items():
        assert torch.equal(randn_tensor(shape, generator=make(), dtype=dtype),
                           diffusers_randn_tensor(shape, generator=make(), dtype=dtype)), name
    torch.manual_seed(9)
    a = randn_tensor(shape, dtype=dtype)
    torch.manual_seed(9)
    assert torch.equal(a, diffusers_randn_tensor(shape, dtype=dtype)), "global generator"
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_tensor(shape, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="empty"):
        randn_tensor(shape, generator=[])


@pytest.mark.gpu
def test_randn_tensor_across_devices():
    shape = (2, 3, 4, 4)
    a = randn_tensor(shape, generator=torch.Generator().manual_seed(1), device="cuda")
    b = diffusers_randn_tensor(shape, generator=torch.Generator().manual_seed(1), device=torch.device("cuda"))
    assert a.device.type == "cuda" and torch.equal(a, b)
    a = randn_tensor(shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
    b = diffusers_randn_tensor(shape, generator=torch.Generator("cuda").manual_seed(1), device=torch.device("cuda"))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="Cannot generate a cpu tensor from a generator of type cuda"):
        randn_tensor(shape, generator=torch.Generator("cuda"), device="cpu")
    s = DDPMScheduler()
    s.set_timesteps(10)  # timesteps on the CPU, samples on CUDA: the tables follow the sample
    x = torch.rand(shape, device="cuda")
    ref = diffusers.DDPMScheduler()
    ref.set_timesteps(10)
    out = s.step(0.1 * x, s.timesteps[0], x, generator=torch.Generator().manual_seed(2)).prev_sample
    expected = ref.step(0.1 * x, ref.timesteps[0], x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert_close(out, expected)


# ----------------------------------------------------------------------------------------------------
# In unmodified diffusers pipelines
# ----------------------------------------------------------------------------------------------------


def tiny_unet() -> "diffusers.UNet2DModel":
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():  # move every parameter off its initial value, zero-initialised layers included
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return unet.eval()


def _generators(spec):
    return [torch.Generator().manual_seed(s) for s in spec] if isinstance(spec, list) else \
        torch.Generator().manual_seed(spec)


@pytest.mark.parametrize("pipeline_name,call", [
    ("DDPMPipeline", {"batch_size": 2, "num_inference_steps": 8, "generator": 0}),
    ("DDPMPipeline", {"batch_size": 3, "num_inference_steps": 5, "generator": [4, 5, 6]}),
    ("DDIMPipeline", {"batch_size": 2, "num_inference_steps": 6, "eta": 0.0, "generator": 1}),
    ("DDIMPipeline", {"batch_size": 2, "num_inference_steps": 6, "eta": 1.0, "generator": [7, 8]}),
    ("DDIMPipeline", {"batch_size": 1, "num_inference_steps": 5, "eta": 0.5, "use_clipped_model_output": True,
                      "generator": 2}),
])
def test_fastdiff_scheduler_in_a_diffusers_pipeline(pipeline_name, call):
    """pipe.scheduler = fastdiff's: the same images as with diffusers' scheduler for the same generator, and the
    generators end in the same state."""
    unet = tiny_unet()
    config = {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True}
    kind = "DDPMScheduler" if pipeline_name == "DDPMPipeline" else "DDIMScheduler"
    reference_pipe = getattr(diffusers, pipeline_name)(unet=unet, scheduler=getattr(diffusers, kind)(**config))
    reference_pipe.set_progress_bar_config(disable=True)
    pipe = getattr(diffusers, pipeline_name)(unet=unet, scheduler=getattr(diffusers, kind)(**config))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = OURS[kind].from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, OURS[kind])
    results, states = [], []
    for p in (pipe, reference_pipe):
        generator = _generators(call["generator"])
        images = p(**{**call, "generator": generator}, output_type="np").images
        results.append(torch.from_numpy(images))
        gens = generator if isinstance(generator, list) else [generator]
        states.append([torch.rand(3, generator=g) for g in gens])  # the next draws equal iff the states do
    assert_close(results[0], results[1], what=f"{pipeline_name} images with fastdiff's scheduler")
    assert all(torch.equal(a, b) for a, b in zip(*states))
    assert results[0].shape == (call["batch_size"], 8, 8, 3)
