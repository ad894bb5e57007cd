"""Multistep DPM-Solver and DPM-Solver++ (Lu et al., 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
Model Sampling in Around 10 Steps"; Lu et al., 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), ODE and SDE variants, orders 1 to 3.

Matches ``diffusers.DPMSolverMultistepScheduler`` (0.42.1) step for step. Every step of every variant is linear in
x_t, the model output and the two previous converted model outputs, so ``set_timesteps`` computes one coefficient
row per step on the host in float64 (``fastdiff.ops.DPM_COEFFS``), the warm-up and final lower-order steps
included, and stores them as a float32 device table. The converted model outputs live in a ring of static device
buffers (``history``), so ``step_at`` reads nothing on the host and is captured in a CUDA graph like DDIM.

Differences from diffusers, all deliberate:

* sigmas are float64 throughout (diffusers rounds its sigma grid to float32 and steps in float32);
* ``trailing`` spacing drops the negative timesteps diffusers' ``np.arange`` adds for some step counts;
* a repeated sigma (many steps, or custom timesteps that repeat) makes that step the identity and the next one
  drop to the highest order whose divided differences exist, where diffusers divides by zero (NaN for heun and
  after the repeat); ``variance_type`` learned models keep the first ``C`` output channels (C = the sample's
  channels) where diffusers keeps the first 3;
* flow-matching sigmas (``use_flow_sigmas``, dynamic shifting) are not supported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers

import numpy as np
import torch

from fastdiff import ops

from fastdiff.randn import randn_tensor

from .protocol import ConfigProtocol, SchedulerConfig, SchedulerOutput
from .schedule import (BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, img2img_start, make_betas,
                       rescale_zero_terminal_snr)

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
VARIANCE_TYPES = (None, "learned", "learned_range")
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24  # diffusers' last alpha-bar under rescale_betas_zero_snr (so sigma_max is finite)
KARRAS_RHO = 7.0  # Karras et al. (2022), eq. 5


@dataclasses.dataclass
class DPMSolverConfig:
    """diffusers' DPMSolverMultistepScheduler arguments, in its order, with its defaults."""

    num_train_timesteps: int = 1000  # T, length of the training diffusion chain
    beta_start: float = 1e-4  # beta_1 of the linear / scaled_linear schedules
    beta_end: float = 0.02  # beta_T of the linear / scaled_linear schedules
    beta_schedule: str = "linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine)
    trained_betas: list | None = None  # explicit betas (length T), overriding the schedule
    solver_order: int = 2  # 1, 2 or 3: how many model outputs the multistep update combines
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon", "sample" (x0) or "v_prediction"
    thresholding: bool = False  # dynamic thresholding of x0 (Saharia et al., 2022); reference path only
    dynamic_thresholding_ratio: float = 0.995  # quantile of |x0| per sample that sets the threshold
    sample_max_value: float = 1.0  # largest threshold
    algorithm_type: str = "dpmsolver++"  # data prediction ("dpmsolver++") or noise prediction ("dpmsolver"), "sde-" SDE
    solver_type: str = "midpoint"  # second-order rule: "midpoint" or "heun"
    lower_order_final: bool = True  # first/second order for the last steps when there are fewer than 15
    euler_at_final: bool = False  # first order for the last step
    use_karras_sigmas: bool = False  # sigmas of Karras et al. (2022), eq. 5, rho = 7
    use_exponential_sigmas: bool = False  # sigmas equally spaced in log sigma
    use_beta_sigmas: bool = False  # sigmas at Beta(0.6, 0.6) quantiles (Lee et al., 2024)
    use_lu_lambdas: bool = False  # steps equally spaced in log sigma (Lu et al., 2022a)
    use_flow_sigmas: bool = False  # flow matching: not supported, must stay False
    flow_shift: float = 1.0  # kept for diffusers (flow matching only)
    final_sigmas_type: str = "zero"  # sigma after the last step: "zero" or "sigma_min" (sigma at t = 0)
    lambda_min_clipped: float = -math.inf  # drop timesteps whose lambda = log(alpha / sigma) is below this
    variance_type: str | None = None  # "learned" / "learned_range": the model also predicts a variance (ignored)
    timestep_spacing: str = "linspace"  # "linspace", "leading" or "trailing" (Lin et al., 2024, Table 2)
    steps_offset: int = 0  # added to "leading" timesteps
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al., 2024, Alg. 1)
    use_dynamic_shifting: bool = False  # flow matching: not supported, must stay False
    time_shift_type: str = "exponential"  # kept for diffusers (flow matching only)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def _check_config(c: DPMSolverConfig) -> None:
    def choice(name, options):
        if getattr(c, name) not in options:
            raise ValueError(f"{name} {getattr(c, name)!r} is not supported; choose one of {options}")

    if c.use_flow_sigmas or c.use_dynamic_shifting:
        raise ValueError("flow-matching sigmas (use_flow_sigmas, use_dynamic_shifting) are not supported")
    if not _is_int(c.num_train_timesteps) or c.num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {c.num_train_timesteps!r}")
    choice("beta_schedule", BETA_SCHEDULES)
    choice("prediction_type", PREDICTION_TYPES)
    choice("algorithm_type", ALGORITHM_TYPES)
    choice("solver_type", SOLVER_TYPES)
    choice("final_sigmas_type", FINAL_SIGMAS_TYPES)
    choice("variance_type", VARIANCE_TYPES)
    choice("timestep_spacing", TIMESTEP_SPACINGS)
    if not _is_int(c.solver_order) or c.solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {c.solver_order!r}")
    if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
        raise ValueError("algorithm_type 'sde-dpmsolver' has no third-order update; use solver_order 1 or 2")
    if c.algorithm_type in ("dpmsolver", "sde-dpmsolver") and c.final_sigmas_type == "zero":
        raise ValueError(f"final_sigmas_type 'zero' needs a data-prediction solver; algorithm_type "
                         f"{c.algorithm_type!r} takes final_sigmas_type 'sigma_min'")
    if sum((c.use_karras_sigmas, c.use_exponential_sigmas, c.use_beta_sigmas, c.use_lu_lambdas)) > 1:
        raise ValueError("use only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas")
    if c.use_beta_sigmas and importlib.util.find_spec("scipy") is None:
        raise ImportError("use_beta_sigmas needs scipy (Beta(0.6, 0.6) quantiles): pip install scipy")
    if not _is_int(c.steps_offset) or c.steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0, got {c.steps_offset!r}")
    if c.thresholding:
        r = c.dynamic_thresholding_ratio
        if not isinstance(r, numbers.Real) or not 0.0 <= r <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1], got {r!r}")
        # a sample_max_value below 1 is allowed, as in diffusers (the threshold is then sample_max_value)
        if not isinstance(c.sample_max_value, numbers.Real) or math.isnan(c.sample_max_value) \
                or c.sample_max_value <= 0:
            raise ValueError(f"sample_max_value must be a number > 0, got {c.sample_max_value!r}")


# ----------------------------------------------------------------------------------------------------
# Sigma grids (host, float64)
# ----------------------------------------------------------------------------------------------------


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation of log sigma between neighbouring training steps."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    # the last training step at or below each sigma (first when none; the table need not be monotonic in float32)
    below = log_sigma[None, :] >= log_sigmas[:, None]
    last_below = len(log_sigmas) - 1 - np.argmax(below[::-1], axis=0)
    low = np.clip(np.where(below.any(axis=0), last_below, 0), 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def dpm_timesteps(n: int, T: int, spacing: str, steps_offset: int, last_timestep: int) -> np.ndarray:
    """diffusers' DPMSolverMultistepScheduler timestep grid (n + 1 points, the last dropped), descending."""
    if spacing == "linspace":
        ts = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last_timestep // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:  # trailing
        ts = np.arange(last_timestep, 0, -T / n).round().astype(np.int64) - 1
        ts = ts[ts >= 0]  # see the module docstring
    return ts


# ----------------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------------


class DPMSolverMultistepScheduler(ConfigProtocol):
    """Multistep DPM-Solver(++): x_{t_i} from x_{t_{i-1}} and the last ``solver_order`` model outputs.

    Built like diffusers' DPMSolverMultistepScheduler (same arguments, ``from_config``, ``save_pretrained``);
    ``backend`` ("reference", "triton", "auto") is fastdiff's.
    """

    config_class = DPMSolverConfig
    diffusers_class_name = "DPMSolverMultistepScheduler"

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
                 dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
                 solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                 use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                 flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
                 timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                 use_dynamic_shifting=False, time_shift_type="exponential", *, backend=None, **private_kwargs):
        arguments = dict(locals())
        self._reject_public_kwargs(type(self).__name__, private_kwargs)
        if algorithm_type == "deis":  # diffusers registers its default instead, as here
            arguments["algorithm_type"] = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            arguments["solver_type"] = "midpoint"
        config = DPMSolverConfig(**{f.name: arguments[f.name] for f in dataclasses.fields(DPMSolverConfig)})
        if config.trained_betas is not None:
            config.trained_betas = [float(b) for b in config.trained_betas]
        _check_config(config)
        self.config = SchedulerConfig(dataclasses.asdict(config))
        self.backend = ops.check_backend(backend) if backend is not None else None
        self.init_noise_sigma = 1.0
        raw_betas = make_betas(config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule,
                               config.trained_betas)
        betas = rescale_zero_terminal_snr(raw_betas) if config.rescale_betas_zero_snr else raw_betas
        ac = torch.cumprod(1.0 - betas, 0)
        if config.rescale_betas_zero_snr:
            ac[-1] = ZERO_SNR_ALPHA_CUMPROD
        self.betas = betas  # float64 host
        self.alphas_cumprod = ac  # float64 host: alpha-bar_t
        # VP schedule: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t), lambda_t = log(alpha_t / sigma_t)
        self.alpha_t = ac.sqrt()
        self.sigma_t = (1.0 - ac).sqrt()
        self.lambda_t = self.alpha_t.log() - self.sigma_t.log()
        self.train_sigmas = ((1.0 - ac) / ac).sqrt()  # float64 host: sigma_t / alpha_t (diffusers' "sigmas")
        self._train_sigmas32 = _float32_train_sigmas(raw_betas, config.rescale_betas_zero_snr)
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._begin_index = None
        self._table_begin = 0
        self._step_index = None
        self._histories: dict = {}

    # ------------------------------------------------------------------ set_timesteps

    def _sigma_grid(self, n: int | None, timesteps) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps int64 [n], sigmas float64 [n + 1]) as diffusers' set_timesteps, in float64."""
        c = self.config
        T = c.num_train_timesteps
        train_sigmas = self.train_sigmas.numpy()
        # Where diffusers derives the grid from its float32 training sigmas (the lambda clip, the ends of the karras
        # / lu / exponential / beta grids and the sigma -> timestep map), so does this: a float64 table moves some
        # fractional timesteps across an integer (cosine schedule near t = T), which would change the model input.
        sigmas32 = self._train_sigmas32.to(torch.float64).numpy()
        log_sigmas = np.log(self._train_sigmas32.numpy()).astype(np.float64)  # a float32 log, as diffusers'
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64)
            if ts.ndim != 1 or ts.size == 0 or (ts < 0).any() or (ts >= T).any():
                raise ValueError(f"timesteps must be a non-empty list of integers in [0, {T - 1}]")
        else:
            if not _is_int(n) or n <= 0:
                raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
            if n > T:
                raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={T}")
            lambda32 = (-np.log(self._train_sigmas32.numpy())).astype(np.float32)
            clipped = int(np.searchsorted(np.flip(lambda32), np.float32(c.lambda_min_clipped)))
            ts = dpm_timesteps(n, T, c.timestep_spacing, c.steps_offset, T - clipped)
            if ts.size == 0 or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"no valid timesteps for {n} steps (steps_offset={c.steps_offset}, "
                                 f"lambda_min_clipped={c.lambda_min_clipped})")
        if timesteps is None and (c.use_karras_sigmas or c.use_lu_lambdas or c.use_exponential_sigmas
                                  or c.use_beta_sigmas):
            s_min, s_max = sigmas32[0], sigmas32[-1]
            ramp = np.linspace(0.0, 1.0, n)
            if c.use_karras_sigmas:  # Karras et al. (2022), eq. 5
                inv = 1.0 / KARRAS_RHO
                sigmas = (s_max**inv + ramp * (s_min**inv - s_max**inv)) ** KARRAS_RHO
            elif c.use_lu_lambdas:  # uniform in log sigma between the training extremes (Lu et al., 2022a)
                sigmas = np.exp(log_sigmas[-1] + ramp * (log_sigmas[0] - log_sigmas[-1]))
            elif c.use_exponential_sigmas:
                sigmas = np.exp(np.linspace(math.log(s_max), math.log(s_min), n))
            else:
                import scipy.stats

                ppf = scipy.stats.beta.ppf(1.0 - ramp, 0.6, 0.6)
                sigmas = s_min + ppf * (s_max - s_min)
            t_frac = sigma_to_t(sigmas, log_sigmas)
            rounded = (c.use_karras_sigmas or c.use_lu_lambdas) and c.beta_schedule != "squaredcos_cap_v2"
            ts = (np.round(t_frac) if rounded else t_frac).astype(np.int64)  # truncation, as diffusers' .to(int64)
        else:
            sigmas = np.interp(ts, np.arange(T), train_sigmas)
        last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        return ts, np.concatenate([np.asarray(sigmas, dtype=np.float64), [last]])

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu=None, timesteps=None,
                      eta: float = 0.0) -> None:
        """Timesteps, sigmas, the coefficient table ``.coeffs`` and ``.noise_streams`` (diffusers' signature).

        ``eta`` exists for fastdiff's uniform sampler interface; the SDE variants' noise is fixed, so only 0.
        """
        c = self.config
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is not supported")
        if eta:
            raise ValueError(f"{type(self).__name__} has no eta (got {eta}); choose an sde- algorithm_type for noise")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None and (c.use_karras_sigmas or c.use_lu_lambdas or c.use_exponential_sigmas
                                      or c.use_beta_sigmas):
            raise ValueError("custom timesteps cannot be combined with karras / lu / exponential / beta sigmas")
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.tolist()
        ts, sigmas = self._sigma_grid(num_inference_steps, timesteps)
        self._timesteps = [int(t) for t in ts]
        self._sigmas = [float(s) for s in sigmas]
        self.num_inference_steps = len(self._timesteps)
        rows = self._table(0)  # raises on a non-finite schedule before anything is replaced
        device = torch.device("cpu") if device is None else torch.device(device)
        self.device = device
        self.timesteps = torch.tensor(self._timesteps, dtype=torch.int64, device=device)
        self.sigmas = torch.tensor(self._sigmas, dtype=torch.float64)  # host, float64
        self.coeffs = torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
        self._table_begin = 0
        self.noise_streams = torch.tensor(self._streams(), dtype=torch.int32, device=device)
        self.needs_noise = c.algorithm_type.startswith("sde-")
        alpha = 1.0 / torch.sqrt(self.sigmas**2 + 1.0)
        self.step_alphas = alpha.to(device=device, dtype=torch.float32)  # alpha_t at each sigma of the grid
        self.step_sigmas = (self.sigmas * alpha).to(device=device, dtype=torch.float32)  # VP sigma_t
        self._step_index = None
        self._begin_index = None

    def _streams(self) -> list[int]:
        """Philox stream of each step: ``step_stream(t)``, offset by T + 1 per earlier repeat of the same timestep."""
        seen: dict = {}
        out = []
        for t in self._timesteps:
            k = seen.get(t, 0)
            seen[t] = k + 1
            out.append(ops.step_stream(t) + k * (self.config.num_train_timesteps + 1))
        return out

    # ------------------------------------------------------------------ coefficients (host, float64)

    def step_order(self, i: int, begin: int = 0) -> int:
        """Order of the update at step i when stepping started at ``begin`` (diffusers' warm-up and final rules)."""
        c = self.config
        n = self.num_inference_steps
        taken = min(max(i - begin, 0), c.solver_order)  # diffusers' lower_order_nums
        lower_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                      or c.final_sigmas_type == "zero")
        lower_second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or taken < 1 or lower_final:
            return 1
        if c.solver_order == 2 or taken < 2 or lower_second:
            return 2
        return 3

    def _table(self, begin: int) -> list[list[float]]:
        rows = [self._coeff_row(i, self.step_order(i, begin)) for i in range(self.num_inference_steps)]
        for i, row in enumerate(rows):
            if not all(math.isfinite(v) for v in row):
                raise ValueError(f"step {i} (timestep {self._timesteps[i]}) has non-finite coefficients: the sigma "
                                 "grid repeats a value; use fewer steps or another spacing")
        return rows

    def _conversion(self, i: int) -> list[float]:
        """x0 and D as linear maps of x and m at step i: [x0_from_x, x0_from_m, d_from_x, d_from_m, d_from_x0]."""
        c = self.config
        sigma = self._sigmas[i]
        alpha_s = 1.0 / math.sqrt(sigma * sigma + 1.0)
        sigma_s = sigma * alpha_s
        # x_t = alpha_s x0 + sigma_s eps (Lu et al., 2022a, eq. 2.1)
        if c.prediction_type == "epsilon":
            x0 = [1.0 / alpha_s, -sigma_s / alpha_s]
            eps = [0.0, 1.0]
        elif c.prediction_type == "sample":
            x0 = [0.0, 1.0]
            eps = [1.0 / sigma_s, -alpha_s / sigma_s] if sigma_s > 0 else [math.nan, math.nan]
        else:  # v_prediction (Salimans & Ho, 2022): x0 = alpha x - sigma v, eps = sigma x + alpha v
            x0 = [alpha_s, -sigma_s]
            eps = [sigma_s, alpha_s]
        if c.algorithm_type.endswith("++"):
            return x0 + [0.0, 0.0, 1.0]  # D = x0 (thresholded)
        if not c.thresholding:
            return [0.0, 0.0] + eps + [0.0]  # D = eps
        # thresholding with a noise-prediction solver: x0 from eps, thresholded, eps re-derived from it
        x0 = [(1.0 - sigma_s * eps[0]) / alpha_s, -sigma_s * eps[1] / alpha_s]
        return x0 + [1.0 / sigma_s, 0.0, -alpha_s / sigma_s]

    def _coeff_row(self, i: int, order: int) -> list[float]:
        """Row i of the DPM_COEFFS table in float64: the math of ``step``, written once."""
        c = self.config
        sg = self._sigmas
        # 1. alpha, sigma at s0 = t_i and t = t_{i+1}; h = lambda_t - lambda_s0 = log(sigma_s0 / sigma_t) (VE sigmas)
        s_t, s_0 = sg[i + 1], sg[i]
        alpha_t = 1.0 / math.sqrt(s_t * s_t + 1.0)
        sigma_t = s_t * alpha_t
        alpha_0 = 1.0 / math.sqrt(s_0 * s_0 + 1.0)
        sigma_0 = s_0 * alpha_0
        h = math.log(s_0 / s_t) if s_t > 0 else math.inf
        if h == 0.0:  # a repeated sigma: the step is the identity (diffusers' first-order limit)
            return self._conversion(i) + [1.0, 0.0, 0.0, 0.0, 0.0]
        if order >= 2 and sg[i - 1] == s_0:  # no divided difference across a repeated sigma (diffusers: NaN)
            order = 1
        if order == 3 and sg[i - 2] == sg[i - 1]:
            order = 2
        # 2. D1 and D2 as combinations of (D0, D_{-1}, D_{-2}) (Lu et al., 2022b, Alg. 2; 2022a, Alg. 5)
        d1 = d2 = [0.0, 0.0, 0.0]
        if order >= 2:
            r0 = math.log(sg[i - 1] / s_0) / h  # h_0 / h
            d1_0 = [1.0 / r0, -1.0 / r0, 0.0]
            d1 = d1_0
        if order == 3:
            r1 = math.log(sg[i - 2] / sg[i - 1]) / h  # h_1 / h
            d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
            diff = [a - b for a, b in zip(d1_0, d1_1)]
            d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d1_0, diff)]
            d2 = [b / (r0 + r1) for b in diff]
        # 3. the exponential integrators; e^{-h} = sigma_t / sigma_s0 (VE), exact at sigma_t = 0
        sde = c.algorithm_type.startswith("sde-")
        heun = c.solver_type == "heun" or order == 3
        noise_std = 0.0
        if c.algorithm_type.endswith("++"):
            if not sde:  # DPM-Solver++ (Lu et al., 2022b, eq. 9 and Alg. 2)
                em1 = math.expm1(-h) if math.isfinite(h) else -1.0  # e^{-h} - 1
                prev_x = sigma_t / sigma_0
                k0 = -alpha_t * em1
                k1 = alpha_t * (em1 / h + 1.0) if heun else -0.5 * alpha_t * em1
                k2 = -alpha_t * ((em1 + h) / (h * h) - 0.5) if order == 3 else 0.0
            else:  # SDE-DPM-Solver++ (Lu et al., 2022b, sec. 5 / appendix)
                e2m1 = math.expm1(-2.0 * h) if math.isfinite(h) else -1.0  # e^{-2h} - 1
                prev_x = sigma_t / sigma_0 * (s_t / s_0)
                k0 = -alpha_t * e2m1
                k1 = alpha_t * (e2m1 / (2.0 * h) + 1.0) if heun else -0.5 * alpha_t * e2m1
                k2 = alpha_t * ((-e2m1 - 2.0 * h) / (4.0 * h * h) - 0.5) if order == 3 else 0.0
                noise_std = sigma_t * math.sqrt(-e2m1)
        else:
            ep1 = math.expm1(h)  # e^{h} - 1
            prev_x = alpha_t / alpha_0
            if not sde:  # DPM-Solver (Lu et al., 2022a, eq. 3.7 and Alg. 4-5, multistep)
                k0 = -sigma_t * ep1
                k1 = -sigma_t * (ep1 / h - 1.0) if heun else -0.5 * sigma_t * ep1
                k2 = -sigma_t * ((ep1 - h) / (h * h) - 0.5) if order == 3 else 0.0
            else:  # SDE-DPM-Solver (Lu et al., 2022b, appendix)
                k0 = -2.0 * sigma_t * ep1
                k1 = -2.0 * sigma_t * (ep1 / h - 1.0) if heun else -sigma_t * ep1
                k2 = 0.0
                noise_std = sigma_t * math.sqrt(math.expm1(2.0 * h))
        # 4. prev = prev_x x + k0 D0 + k1 D1 + k2 D2, D1 and D2 expanded over (D0, D_{-1}, D_{-2})
        if order == 1:
            k1 = k2 = 0.0
        p = [k0 + k1 * d1[0] + k2 * d2[0], k1 * d1[1] + k2 * d2[1], k1 * d1[2] + k2 * d2[2]]
        return self._conversion(i) + [prev_x] + p + [noise_std]

    # ------------------------------------------------------------------ begin index and history

    @property
    def step_index(self):
        """diffusers' counter: the step the next ``step`` call takes (None before the first)."""
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``begin_index`` (image-to-image); rewrites the warm-up rows of ``.coeffs`` in place,
        so a CUDA graph captured on the table stays valid. Host work: call it outside a captured region."""
        self._check_ready()
        if not _is_int(begin_index) or not 0 <= begin_index < self.num_inference_steps:
            raise ValueError(f"begin_index must be an integer in [0, {self.num_inference_steps - 1}], got "
                             f"{begin_index!r}")
        self._begin_index = int(begin_index)
        self._use_table_begin(int(begin_index))

    def _use_table_begin(self, begin: int) -> None:
        if begin != self._table_begin:
            rows = torch.tensor(self._table(begin), dtype=torch.float64)
            self.coeffs.copy_(rows.to(dtype=torch.float32))
            self._table_begin = begin

    def history_for(self, sample: torch.Tensor) -> torch.Tensor:
        """The ring of ``solver_order`` converted model outputs for samples like ``sample`` (static, zeroed once).

        One buffer per (shape, dtype, device, layout), kept for the scheduler's life, so graphs captured for
        different batch sizes never share or lose one.
        """
        cl = sample.dim() == 4 and not sample.is_contiguous() \
            and sample.is_contiguous(memory_format=torch.channels_last)
        key = (tuple(sample.shape), sample.dtype, sample.device, cl)
        buf = self._histories.get(key)
        if buf is None:
            k = self.config.solver_order
            if cl:
                n, ch, hh, ww = sample.shape
                buf = torch.zeros((k, n, hh, ww, ch), dtype=sample.dtype, device=sample.device).permute(0, 1, 4, 2, 3)
            else:
                buf = torch.zeros((k, *sample.shape), dtype=sample.dtype, device=sample.device)
            self._histories[key] = buf
        return buf

    @property
    def model_outputs(self) -> list:
        """diffusers' list of the last ``solver_order`` converted model outputs, oldest first (None where unset)."""
        if not self._histories or self.timesteps is None:
            return [None] * self.config.solver_order
        hist = next(reversed(self._histories.values()))
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        k = hist.shape[0]
        return [hist[(i - j) % k] for j in range(k, 0, -1)]

    @model_outputs.setter
    def model_outputs(self, outputs) -> None:
        """Store converted model outputs (oldest first) as the history the next step reads."""
        outputs = [o for o in outputs if o is not None]
        if not outputs:
            return
        hist = self.history_for(outputs[-1])
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        k = hist.shape[0]
        for j, o in enumerate(reversed(outputs[-k:]), start=1):
            hist[(i - j) % k].copy_(o)

    # ------------------------------------------------------------------ step

    def _check_ready(self) -> None:
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")

    def index_for_timestep(self, timestep) -> int:
        """diffusers' rule: the timestep's position, its second one if it repeats, the last step if absent."""
        self._check_ready()
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point() or timestep.is_complex():
                raise ValueError(f"timestep must be an integer scalar, got a {timestep.dtype} tensor of shape "
                                 f"{tuple(timestep.shape)}")
            view = self._view_index(timestep)
            if view is not None:
                timestep = self._timesteps[view]
            elif timestep.device.type != "cpu":
                raise ValueError(f"timestep is a {timestep.device} tensor that is not an element of .timesteps; "
                                 "pass an int (or use step_at with a step index) to avoid reading the device")
            else:
                timestep = timestep.item()
        if not _is_int(timestep):
            raise ValueError(f"timestep must be an integer, got {timestep!r}")
        hits = [i for i, t in enumerate(self._timesteps) if t == int(timestep)]
        if not hits:
            return self.num_inference_steps - 1
        return hits[1] if len(hits) > 1 else hits[0]

    def _view_index(self, t: torch.Tensor) -> int | None:
        ts = self.timesteps
        if t._base is not ts:
            return None
        i, rem = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0))
        return i if rem == 0 and 0 <= i < ts.shape[0] else None

    def _threshold(self):
        c = self.config
        return (float(c.dynamic_thresholding_ratio), float(c.sample_max_value)) if c.thresholding else None

    def _mean_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """A learned-variance model's output carries the variance after the mean channels (diffusers' [:, :3])."""
        c = self.config
        if c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon" \
                and model_output.dim() > 1 and model_output.shape[1] != sample.shape[1]:
            mean = model_output[:, :sample.shape[1]]
            channels_last = sample.dim() == 4 and not sample.is_contiguous() \
                and sample.is_contiguous(memory_format=torch.channels_last)
            return mean.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return model_output

    def step_at(self, model_output: torch.Tensor, step_index, sample: torch.Tensor, *, noise=None,
                seeds=None) -> torch.Tensor:
        """x_{t_{i+1}} from step ``step_index`` (int or integer device tensor); capturable, no host read.

        Reads and updates the history ring for samples like ``sample``. Noise for the SDE variants: ``noise``
        (like sample) or ``seeds`` (int64 [N], Philox noise from ``.noise_streams``).
        """
        self._check_ready()
        if noise is None and seeds is None and self.needs_noise:
            raise ValueError(f"{type(self).__name__}.step_at: an SDE algorithm adds noise; pass noise= or seeds=")
        if not self.needs_noise:
            noise = seeds = None
        model_output = self._mean_output(model_output, sample)
        return ops.dpm_solver_step(sample, model_output, self.history_for(sample), self.coeffs, step_index,
                                   threshold=self._threshold(), noise=noise, seeds=seeds,
                                   noise_streams=self.noise_streams if seeds is not None else None,
                                   backend=self.backend)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True, *, noise=None, seeds=None):
        """One multistep DPM-Solver step from ``timestep`` to the next one, as diffusers' ``step``.

        The step taken is the scheduler's own counter (set from ``timestep`` or ``begin_index`` on the first
        call). Noise for the SDE variants: ``variance_noise`` (or ``noise``), else Philox noise from ``seeds``,
        else drawn from ``generator`` exactly as diffusers' ``randn_tensor`` draws it.
        """
        # Notation (code name -> Lu et al., 2022a/b):
        #   sample -> x_{t_{i-1}} (here x_s0);  sigmas[i] -> sigma_s0 / alpha_s0;  alpha, sigma -> alpha_t, sigma_t
        #   h -> h_i = lambda_t - lambda_s0, lambda = log(alpha / sigma);  r0, r1 -> h_{i-1} / h_i, h_{i-2} / h_i
        #   history D0, D_{-1}, D_{-2} -> x_theta(x_{t_{i-1}}), ... (++: data prediction), or eps_theta
        # Steps (coefficients precomputed by _coeff_row, one row per step):
        #   1. D0 = x0 = (x - sigma_s0 eps) / alpha_s0 (or eps), thresholded if asked            (2022b, eq. 4)
        #   2. order: 1 at the first step, 2 at the second, solver_order after; lower at the end (lower_order_final)
        #   3. ++ first order: x_t = sigma_t / sigma_s0 x_s0 - alpha_t (e^{-h} - 1) D0              (2022b, eq. 9)
        #      second order adds D1 = (D0 - D_{-1}) / r0 (midpoint: -alpha_t (e^{-h} - 1) / 2 D1)  (2022b, Alg. 2)
        #      third order adds D1, D2 from divided differences of D0, D_{-1}, D_{-2}         (2022a, Alg. 5)
        #   4. SDE variants: x_t += sigma_t sqrt(1 - e^{-2h}) z with the SDE coefficients        (2022b, sec. 5)
        self._check_ready()
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None \
                else self.index_for_timestep(timestep)
            self._use_table_begin(self._step_index)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"step {i} is past the last of {self.num_inference_steps} steps; call set_timesteps again")
        noise = variance_noise if variance_noise is not None else noise
        given = [k for k, v in (("generator", generator), ("noise", noise), ("seeds", seeds)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{type(self).__name__}.step: pass only one of generator, variance_noise/noise and "
                             f"seeds (got {' and '.join(given)})")
        if self.needs_noise and noise is None and seeds is None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=torch.float32)
        if self.coeffs.device != sample.device:
            raise ValueError(f"the scheduler's tables are on {self.coeffs.device}, the sample on {sample.device}; "
                             "pass device= to set_timesteps")
        prev = self.step_at(model_output, i, sample, noise=noise, seeds=seeds)
        self._step_index = i + 1
        if not return_dict:
            return (prev,)  # diffusers' DPMSolverMultistepScheduler returns the sample alone
        return SchedulerOutput(prev_sample=prev, pred_original_sample=self._x0_of_step(i, sample))

    def _x0_of_step(self, i: int, sample: torch.Tensor) -> torch.Tensor:
        """The (thresholded) x0 prediction of step i, from the history entry it just wrote."""
        hist = self.history_for(sample)
        d = hist[i % hist.shape[0]]
        if self.config.algorithm_type.endswith("++"):
            return d.clone()
        sigma = self._sigmas[i]
        alpha_s = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return ((sample.float() - sigma * alpha_s * d.float()) / alpha_s).to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    # ------------------------------------------------------------------ forward process and img2img

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t noise at the grid sigmas of ``timesteps`` (diffusers' rule: the begin index
        when set, else each timestep's position in the schedule, its second if repeated, the last if absent).

        Computed on the device without host reads, in float32 from float64 tables (float64 for float64 input),
        returned in ``original_samples``' dtype.
        """
        self._check_ready()
        x0 = original_samples
        if noise.shape != x0.shape:
            raise ValueError(f"add_noise: noise shape {tuple(noise.shape)} != sample shape {tuple(x0.shape)}")
        if not isinstance(timesteps, torch.Tensor):
            if not _is_int(timesteps):
                raise ValueError(f"add_noise: timesteps must be an int or an integer tensor, got {timesteps!r}")
            timesteps = torch.tensor([int(timesteps)], dtype=torch.int64)
        if timesteps.is_floating_point() or timesteps.is_complex():
            raise ValueError(f"add_noise: timesteps must be integers, got {timesteps.dtype}")
        if timesteps.numel() not in (1, x0.shape[0]):
            raise ValueError(f"add_noise: {timesteps.numel()} timesteps for {x0.shape[0]} samples")
        device = x0.device
        if x0.dtype == torch.float64:  # a float64 caller gets float64 coefficients
            alpha64 = 1.0 / torch.sqrt(self.sigmas**2 + 1.0)
            alphas, sigmas = alpha64.to(device), (self.sigmas * alpha64).to(device)
        else:
            alphas, sigmas = self.step_alphas.to(device), self.step_sigmas.to(device)
        t = timesteps.to(device).reshape(-1)
        if self._begin_index is not None:
            index = self._step_index if self._step_index is not None else self._begin_index
            idx = torch.full_like(t, index)
        else:
            sched = self.timesteps.to(device)
            pos = torch.arange(sched.shape[0], device=device)
            hit = t[:, None] == sched[None, :]
            none = torch.full_like(pos, sched.shape[0])
            first = torch.where(hit, pos, none).min(dim=1).values
            second = torch.where(hit & (pos[None, :] != first[:, None]), pos, none).min(dim=1).values
            idx = torch.where(second < sched.shape[0], second, first)
            idx = torch.where(first < sched.shape[0], idx, torch.full_like(idx, sched.shape[0] - 1))
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = alphas.index_select(0, idx).reshape(shape)
        s = sigmas.index_select(0, idx).reshape(shape)
        return (a * x0.to(a.dtype) + s * noise.to(a.dtype)).to(x0.dtype)

    def img2img_start(self, strength) -> int:
        """Index into ``.timesteps`` where image-to-image denoising starts: n - min(int(n * strength), n)."""
        self._check_ready()
        return img2img_start(self.num_inference_steps, strength)


def _float32_train_sigmas(raw_betas: torch.Tensor, rescale_zero_snr: bool) -> torch.Tensor:
    """diffusers' float32 training sigmas sqrt((1 - alpha-bar) / alpha-bar) from the unrescaled betas, its float32
    zero-terminal-SNR rescaling (Lin et al., 2024, Alg. 1) and last alpha-bar of 2**-24 included."""
    betas = raw_betas.to(torch.float32)
    if rescale_zero_snr:
        root = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        ac = root**2
        betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
    ac = torch.cumprod(1.0 - betas, dim=0)
    if rescale_zero_snr:
        ac[-1] = ZERO_SNR_ALPHA_CUMPROD
    return ((1 - ac) / ac) ** 0.5


ConfigProtocol._registry.append(DPMSolverMultistepScheduler)  # its keys count as a sibling's in from_config
