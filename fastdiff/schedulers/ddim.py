"""DDIM sampling (Song, Meng & Ermon, 2021, "Denoising Diffusion Implicit Models").

Matches ``diffusers.DDIMScheduler`` (0.42.1) step for step, including its previous-timestep rule
t' = t - T // n for every spacing (diffusers issue #12633). The coefficients are computed once per
``set_timesteps`` in float64 and stored as a float32 ``[steps, 9]`` table (``fastdiff.ops.STEP_COEFFS``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from .protocol import SchedulerOutput
from .schedule import SchedulerBase, check_eta, x0_and_eps_coeffs


@dataclasses.dataclass
class DDIMConfig:
    """diffusers' DDIMScheduler arguments, in its order, with its defaults."""

    num_train_timesteps: int = 1000  # T, length of the training diffusion chain
    beta_start: float = 1e-4  # beta_1 of the linear / scaled_linear schedules
    beta_end: float = 0.02  # beta_T of the linear / scaled_linear schedules
    beta_schedule: str = "linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
    trained_betas: list | None = None  # explicit betas (length T), overriding the schedule
    clip_sample: bool = True  # clamp the predicted x0 to [-clip_sample_range, clip_sample_range]
    set_alpha_to_one: bool = True  # alpha-bar after the last step: 1 (True) or alphas_cumprod[0] (False)
    steps_offset: int = 0  # added to "leading" timesteps
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon", "sample" (x0) or "v_prediction"
    thresholding: bool = False  # dynamic thresholding (Saharia et al., 2022): not supported, must stay False
    dynamic_thresholding_ratio: float = 0.995  # kept for diffusers (used only with thresholding)
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0  # kept for diffusers (used only with thresholding)
    timestep_spacing: str = "leading"  # "leading", "trailing" or "linspace" (Lin et al., 2024, Table 2)
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al., 2024, Alg. 1)


class DDIMScheduler(SchedulerBase):
    """DDIM: x_{t'} = sqrt(a_{t'}) x0 + sqrt(1 - a_{t'} - sigma_t^2) eps + sigma_t z, sigma_t scaled by eta.

    Built like diffusers' DDIMScheduler (same arguments, ``from_config``); ``backend`` ("reference",
    "triton", "auto") is fastdiff's.
    """

    config_class = DDIMConfig
    diffusers_class_name = "DDIMScheduler"

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                 prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                 clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                 rescale_betas_zero_snr=False, *, backend=None, **private_kwargs):
        self._setup(locals())
        # alpha-bar after the final step (the step whose t' < 0)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self._ac[0]
        self.eta = 0.0
        self.use_clipped_model_output = False

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, *,
                      eta: float = 0.0, use_clipped_model_output: bool = False) -> None:
        """Timesteps, coefficient table ``.coeffs`` and ``.noise_streams`` for ``num_inference_steps`` steps.

        ``timesteps`` (custom timesteps) is refused: diffusers' DDIM has none, its step goes t -> t - T // n.
        ``eta`` and ``use_clipped_model_output`` are the settings the table (and so ``step_at``) is built for;
        ``step`` takes them per call, as diffusers' step does, and uses the table when they agree.
        """
        grid, n, _ = self._grid_from_arguments(num_inference_steps, timesteps, custom_allowed=False)
        self._set_grid(grid, device, num_inference_steps=n, eta=check_eta(eta),
                       use_clipped_model_output=bool(use_clipped_model_output))

    def previous_timestep(self, i: int) -> int:
        """t' for row i: t - T // n, as diffusers' DDIM step (may be negative: then alpha-bar = final_alpha_cumprod)."""
        return self._timesteps[i] - self.config.num_train_timesteps // self.num_inference_steps

    def _coeff_row(self, i: int, eta: float | None = None, use_clipped_model_output: bool | None = None) -> list[float]:
        """Row i of the STEP_COEFFS table in float64 (the math of ``step``, written once)."""
        eta = self.eta if eta is None else eta
        clipped_eps = self.use_clipped_model_output if use_clipped_model_output is None else use_clipped_model_output
        t = self._timesteps[i]
        # 1. previous timestep t' and alphas
        alpha_prod_t = self._ac[t]
        alpha_prod_t_prev = self._prev_alpha_prod(self.previous_timestep(i), self.final_alpha_cumprod)
        beta_prod_t = 1.0 - alpha_prod_t
        beta_prod_t_prev = 1.0 - alpha_prod_t_prev
        # 2. predicted x0 and eps from the model output (eq. 12, "predicted x0"); the op clips x0
        x0_from_x, x0_from_m, eps_from_x, eps_from_m = x0_and_eps_coeffs(self.config.prediction_type, alpha_prod_t)
        eps_from_x0 = 0.0
        if clipped_eps:  # eps = (x_t - sqrt(a_t) x0_clipped) / sqrt(1 - a_t)
            eps_from_x, eps_from_m = 1.0 / math.sqrt(beta_prod_t), 0.0
            eps_from_x0 = -math.sqrt(alpha_prod_t) / math.sqrt(beta_prod_t)
        # 3. sigma_t(eta) = eta sqrt((1 - a_{t'}) / (1 - a_t)) sqrt(1 - a_t / a_{t'})                    (eq. 16)
        variance = beta_prod_t_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev)
        noise_std = eta * math.sqrt(variance)
        # 4. x_{t'} = sqrt(a_{t'}) x0 + sqrt(1 - a_{t'} - sigma_t^2) eps + sigma_t z                     (eq. 12)
        direction_sq = 1.0 - alpha_prod_t_prev - noise_std**2
        if direction_sq < 0.0:
            if direction_sq < -1e-12:
                raise ValueError(f"eta={eta} is too large at timestep {t}: 1 - alpha-bar_prev - sigma^2 = "
                                 f"{direction_sq:.3g} < 0")
            direction_sq = 0.0
        prev_from_x0 = math.sqrt(alpha_prod_t_prev)
        prev_from_eps = math.sqrt(direction_sq)
        return [x0_from_x, x0_from_m, eps_from_x, eps_from_m, eps_from_x0, prev_from_x0, prev_from_eps, 0.0,
                noise_std]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True, *, noise: torch.Tensor | None = None,
             seeds: torch.Tensor | None = None) -> SchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t'} (t' = t - T // n), as diffusers' DDIMScheduler.step.

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``, or that pair as a tuple when
        ``return_dict=False``. ``timestep``: an int (any training timestep, as in diffusers) or an element of
        ``.timesteps``. ``eta`` scales the noise (0: deterministic); ``use_clipped_model_output`` re-derives eps
        from the clipped x0; a row for other settings than ``set_timesteps``' is computed on the host. Noise z
        (drawn when eta > 0, as diffusers draws it): ``variance_noise`` (or fastdiff's keyword-only ``noise``) as
        given, else ``generator`` (diffusers' ``randn_tensor``; torch's global generator when None), or
        fastdiff's keyword-only ``seeds`` (int64 [N], per-image Philox noise).
        """
        # Notation (code name -> Song et al., 2021; their alpha_t is alpha-bar_t of Ho et al.):
        #   sample -> x_t;  model_output -> eps_theta(x_t, t) (or x0, or v);  alphas_cumprod[t] -> alpha_t
        #   alpha_prod_t_prev -> alpha_{t'} (final_alpha_cumprod when t' < 0);  pred_original_sample -> f_theta(x_t)
        #   pred_epsilon -> eps_theta;  noise_std -> sigma_t(eta);  noise -> z ~ N(0, I);  prev_sample -> x_{t'}
        # Steps (coefficients precomputed by _coeff_row, one row per timestep):
        #   1. t' = t - T // n
        #   2. x0 = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t), clipped if clip_sample         ("predicted x0", eq. 12)
        #      (with use_clipped_model_output: eps = (x_t - sqrt(alpha_t) x0) / sqrt(1 - alpha_t))
        #   3. sigma_t = eta sqrt((1 - alpha_{t'}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t'})         (eq. 16)
        #   4. x_{t'} = sqrt(alpha_{t'}) x0 + sqrt(1 - alpha_{t'} - sigma_t^2) eps + sigma_t z             (eq. 12)
        self._check_ready()
        eta = check_eta(eta)
        clipped = bool(use_clipped_model_output)
        if variance_noise is not None and noise is not None:
            raise ValueError("DDIMScheduler.step: pass variance_noise or noise, not both")
        noise = variance_noise if variance_noise is not None else noise
        i, t = self._locate(timestep)
        row = None
        if i is None:  # not on the grid: diffusers steps any timestep to t - T // n
            T = self.config.num_train_timesteps
            if not 0 <= t < T:
                raise ValueError(f"timestep {t} is outside [0, {T - 1}]")
            row = self._off_grid_row(t, eta, clipped)
        elif eta != self.eta or clipped != self.use_clipped_model_output:
            row = self._coeff_row(i, eta, clipped)
        return self._step(model_output, sample, i, t, row, eta > 0, generator=generator, noise=noise, seeds=seeds,
                          return_dict=return_dict)

    def _off_grid_row(self, t: int, eta: float, use_clipped_model_output: bool) -> list[float]:
        """The coefficient row of a timestep that is not in ``.timesteps`` (same n, so the same t' = t - T // n)."""
        probe = copy.copy(self)
        probe._timesteps = [t]
        return probe._coeff_row(0, eta, use_clipped_model_output)
