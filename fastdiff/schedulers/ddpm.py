"""DDPM ancestral sampling (Ho, Jain & Abbeel, 2020, "Denoising Diffusion Probabilistic Models").

Matches ``diffusers.DDPMScheduler`` (0.42.1) step for step; the coefficients are computed once per
``set_timesteps`` in float64 and stored as a float32 ``[steps, 9]`` table (``fastdiff.ops.STEP_COEFFS``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .protocol import SchedulerOutput
from .schedule import SchedulerBase, check_eta, x0_and_eps_coeffs

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
MIN_VARIANCE = 1e-20  # diffusers clamps the posterior variance here before taking its log


@dataclasses.dataclass
class DDPMConfig:
    """diffusers' DDPMScheduler arguments, in its order, with its defaults."""

    num_train_timesteps: int = 1000  # T, length of the training diffusion chain
    beta_start: float = 1e-4  # beta_1 of the linear / scaled_linear schedules
    beta_end: float = 0.02  # beta_T of the linear / scaled_linear schedules
    beta_schedule: str = "linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
    trained_betas: list | None = None  # explicit betas (length T), overriding the schedule
    variance_type: str = "fixed_small"  # "fixed_small" (beta-tilde_t), "fixed_small_log" (same), "fixed_large" (beta_t)
    clip_sample: bool = True  # clamp the predicted x0 to [-clip_sample_range, clip_sample_range]
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon", "sample" (x0) or "v_prediction"
    thresholding: bool = False  # dynamic thresholding (Saharia et al., 2022): not supported, must stay False
    dynamic_thresholding_ratio: float = 0.995  # kept for diffusers (used only with thresholding)
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0  # kept for diffusers (used only with thresholding)
    timestep_spacing: str = "leading"  # "leading", "trailing" or "linspace" (Lin et al., 2024, Table 2)
    steps_offset: int = 0  # added to "leading" timesteps
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al., 2024, Alg. 1)


class DDPMScheduler(SchedulerBase):
    """DDPM: x_{t'} ~ N(mu-tilde_t(x_t, x0), sigma_t^2 I) from x0 predicted by the model (t' = previous timestep).

    Built like diffusers' DDPMScheduler (same arguments, ``from_config``); before ``set_timesteps`` it steps
    over every training timestep, as diffusers' does. ``backend`` ("reference", "triton", "auto") is fastdiff's.
    """

    config_class = DDPMConfig
    diffusers_class_name = "DDPMScheduler"
    steps_without_set_timesteps = True

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                 thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                 timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False, *, backend=None,
                 **private_kwargs):
        self._setup(locals())

    @staticmethod
    def _validate_extra(config: DDPMConfig) -> None:
        if config.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {config.variance_type!r} is not supported; choose one of {VARIANCE_TYPES}")

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, *,
                      eta: float = 0.0) -> None:
        """Timesteps, coefficient table ``.coeffs`` and ``.noise_streams`` for ``num_inference_steps`` steps, or
        for the custom descending ``timesteps`` (diffusers' arguments; pass one of the two).

        ``eta`` exists for a uniform sampler interface; DDPM's noise is fixed by ``variance_type``, so only 0.
        """
        if check_eta(eta) != 0.0:
            raise ValueError(f"DDPMScheduler has no eta (got {eta}); its noise level is set by variance_type")
        grid, n, custom = self._grid_from_arguments(num_inference_steps, timesteps, custom_allowed=True)
        self._set_grid(grid, device, num_inference_steps=n, custom=custom)

    def previous_timestep(self, i: int) -> int:
        """t' for row i: the next timestep in the schedule, -1 after the last.

        Takes a row index (the coefficient rows use it), unlike diffusers' ``previous_timestep(timestep)``.
        """
        return self._timesteps[i + 1] if i + 1 < len(self._timesteps) else -1

    def _coeff_row(self, i: int) -> list[float]:
        """Row i of the STEP_COEFFS table in float64 (the math of ``step``, written once)."""
        t = self._timesteps[i]
        prev_t = self.previous_timestep(i)
        # 1. alphas and betas for the (possibly skipping) step t -> t'
        alpha_prod_t = self._ac[t]
        alpha_prod_t_prev = self._prev_alpha_prod(prev_t, 1.0)
        beta_prod_t = 1.0 - alpha_prod_t
        beta_prod_t_prev = 1.0 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1.0 - current_alpha_t
        # 2. predicted x0 from the model output (eq. 15 for epsilon); the op clips it
        x0_from_x, x0_from_m, _, _ = x0_and_eps_coeffs(self.config.prediction_type, alpha_prod_t)
        # 3. posterior mean mu-tilde_t = c_x0 x0 + c_xt x_t (eq. 7)
        prev_from_x0 = math.sqrt(alpha_prod_t_prev) * current_beta_t / beta_prod_t
        prev_from_x = math.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        # 4. noise std sigma_t (eq. 6-7): sqrt(beta-tilde_t) or sqrt(beta_t); no noise when t = 0
        if t == 0:
            noise_std = 0.0
        elif self.config.variance_type == "fixed_large":
            noise_std = math.sqrt(current_beta_t)
        else:  # fixed_small and fixed_small_log: beta-tilde_t = (1 - a_{t'}) / (1 - a_t) beta_t
            noise_std = math.sqrt(max(beta_prod_t_prev / beta_prod_t * current_beta_t, MIN_VARIANCE))
        return [x0_from_x, x0_from_m, 0.0, 0.0, 0.0, prev_from_x0, 0.0, prev_from_x, noise_std]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, noise: torch.Tensor | None = None,
             seeds: torch.Tensor | None = None) -> SchedulerOutput | tuple:
        """One DDPM step x_t -> x_{t'} (t' the next timestep of the schedule), as diffusers' DDPMScheduler.step.

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``, or that pair as a tuple when
        ``return_dict=False``. ``timestep``: an int or an element of ``.timesteps``. Noise z (drawn when t > 0,
        as diffusers draws it): from ``generator`` (a torch.Generator or one per sample, diffusers'
        ``randn_tensor``; torch's global generator when None), or fastdiff's keyword-only ``noise`` (a tensor
        like sample) or ``seeds`` (int64 [N], per-image Philox noise).
        """
        # Notation (code name -> Ho et al., 2020):
        #   sample -> x_t;  model_output -> eps_theta(x_t, t) (or x0, or v);  alphas_cumprod[t] -> alpha-bar_t
        #   current_alpha_t = alpha-bar_t / alpha-bar_{t'} -> alpha_t;  current_beta_t -> beta_t = 1 - alpha_t
        #   pred_original_sample -> x0-hat;  noise_std -> sigma_t;  noise -> z ~ N(0, I);  prev_sample -> x_{t'}
        # Steps (coefficients precomputed by _coeff_row, one row per timestep):
        #   1. x0-hat = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)                       (eq. 15)
        #      then clip x0-hat to [-clip_sample_range, clip_sample_range] if clip_sample
        #   2. mu-tilde = sqrt(alpha-bar_{t'}) beta_t / (1 - alpha-bar_t) x0-hat
        #               + sqrt(alpha_t) (1 - alpha-bar_{t'}) / (1 - alpha-bar_t) x_t                    (eq. 7)
        #   3. sigma_t^2 = beta-tilde_t = (1 - alpha-bar_{t'}) / (1 - alpha-bar_t) beta_t (fixed_small),
        #      or beta_t (fixed_large); sigma_t = 0 at t = 0                                            (eq. 6-7)
        #   4. x_{t'} = mu-tilde + sigma_t z                                                            (eq. 6)
        i = self.index_of(timestep)
        t = self._timesteps[i]
        return self._step(model_output, sample, i, t, None, t > 0, generator=generator, noise=noise, seeds=seeds,
                          return_dict=return_dict)
