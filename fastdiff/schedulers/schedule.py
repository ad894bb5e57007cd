"""Noise schedules and timestep grids shared by the DDPM and DDIM schedulers, plus their common machinery.

Everything here matches diffusers (0.42.1) value for value:

* betas are diffusers' float32 values exactly (``torch.linspace`` in float32, the cosine schedule rounded
  to float32, ``trained_betas`` rounded to float32), so a model sees the schedule it was trained with;
  from there on every quantity (alphas_cumprod, square roots, step coefficients) is float64 on the host.
* timesteps follow diffusers' ``leading`` / ``trailing`` / ``linspace`` rules, numpy rounding included,
  with one deliberate fix: for some step counts (61, 103, ... of 1000) diffusers' ``trailing`` grid gets a
  spurious extra timestep ``-1`` from ``np.arange`` on a float step; fastdiff keeps the first ``n``.

A scheduler turns its schedule into a coefficient table (``fastdiff.ops.STEP_COEFFS``, one row per step)
that the fused update-step op reads on the device, so the sampling loop needs no host work per step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch

from fastdiff import ops

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
COSINE_MAX_BETA = 0.999  # betas_for_alpha_bar's cap (Nichol & Dhariwal, 2021, eq. 17)


# ----------------------------------------------------------------------------------------------------
# Schedules (host, float64)
# ----------------------------------------------------------------------------------------------------


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None, rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """beta_1..beta_T as a float64 CPU tensor holding diffusers' float32 values (see the module docstring)."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor([float(b) for b in trained_betas], dtype=torch.float32)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas has {betas.numel()} values, expected num_train_timesteps={T}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # linear in sqrt(beta) (latent diffusion)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # cosine schedule, Nichol & Dhariwal (2021), eq. 17
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), COSINE_MAX_BETA) for i in range(T)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")
    betas = betas.to(torch.float64)
    if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
        raise ValueError(f"betas must lie in (0, 1]; got min {betas.min().item():.3g}, max {betas.max().item():.3g}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so alphas_cumprod[T-1] = 0 (Lin et al., 2024, Algorithm 1), in float64.

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_ac = torch.cumprod(1.0 - betas.to(torch.float64), 0).sqrt()
    first, last = sqrt_ac[0].item(), sqrt_ac[-1].item()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def make_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0) -> list[int]:
    """The descending timestep grid diffusers' ``set_timesteps`` builds (Lin et al., 2024, Table 2)."""
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[:n] - 1  # [:n]: see the module docstring
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}")
    ts = [int(t) for t in ts]
    if ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"timesteps {ts[0]}..{ts[-1]} fall outside [0, {T - 1}]"
                         f" (steps_offset={steps_offset} is too large for {n} steps)")
    return ts


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    if n > num_train_timesteps:
        raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={num_train_timesteps}")
    return int(n)


def check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def x0_and_eps_coeffs(prediction_type: str, alpha_prod_t: float) -> tuple[float, float, float, float]:
    """(x0_from_x, x0_from_m, eps_from_x, eps_from_m): x0 and eps as linear maps of x_t and the model output m.

    With a = alphas_cumprod[t], b = 1 - a (x_t = sqrt(a) x0 + sqrt(b) eps, Ho et al., 2020, eq. 4):
    epsilon: x0 = (x - sqrt(b) m) / sqrt(a) (eq. 15), eps = m; sample: x0 = m, eps = (x - sqrt(a) m) / sqrt(b);
    v_prediction (Salimans & Ho, 2022, sec. 4): x0 = sqrt(a) x - sqrt(b) m, eps = sqrt(b) x + sqrt(a) m.
    """
    a = alpha_prod_t
    b = 1.0 - a
    if prediction_type == "epsilon":
        if a == 0.0:
            raise ValueError("alphas_cumprod[t] = 0 (zero terminal SNR): an epsilon-prediction model cannot give x0 "
                             "there; use prediction_type 'v_prediction' or 'sample', or leading spacing")
        return 1.0 / math.sqrt(a), -math.sqrt(b) / math.sqrt(a), 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1.0 / math.sqrt(b), -math.sqrt(a) / math.sqrt(b)
    if prediction_type == "v_prediction":
        return math.sqrt(a), -math.sqrt(b), math.sqrt(b), math.sqrt(a)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def img2img_start(num_inference_steps: int, strength) -> int:
    """Index into the timesteps where image-to-image denoising starts (as diffusers' img2img pipelines)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    n = num_inference_steps
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0)


# ----------------------------------------------------------------------------------------------------
# Common scheduler machinery
# ----------------------------------------------------------------------------------------------------


class SchedulerBase:
    """What DDPM and DDIM share: schedule, timesteps, device buffers, step dispatch, add_noise.

    Subclasses define ``config_class``, ``diffusers_class_name``, ``_coeff_row(i) -> list[float]`` (row ``i``
    of the STEP_COEFFS table, float64) and may check their own config fields in ``_validate_extra``.
    """

    config_class: type
    diffusers_class_name: str

    @staticmethod
    def _validate_extra(config) -> None:
        pass

    def _setup(self, config, backend) -> None:
        c = config
        if isinstance(c.num_train_timesteps, bool) or not isinstance(c.num_train_timesteps, numbers.Integral) \
                or c.num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {c.num_train_timesteps!r}")
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {c.prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
        if c.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {c.timestep_spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}")
        if isinstance(c.steps_offset, bool) or not isinstance(c.steps_offset, numbers.Integral) or c.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {c.steps_offset!r}")
        if c.clip_sample and not (isinstance(c.clip_sample_range, numbers.Real) and c.clip_sample_range > 0):
            raise ValueError(f"clip_sample_range must be a number > 0, got {c.clip_sample_range!r}")
        self._validate_extra(c)
        if c.trained_betas is not None:
            c.trained_betas = tuple(float(b) for b in c.trained_betas)
        self.config = c
        self.backend = ops.check_backend(backend) if backend is not None else None
        self.init_noise_sigma = 1.0
        betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
                           c.rescale_betas_zero_snr)
        self.betas = betas  # float64 host
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)  # float64 host: alpha-bar_t
        self._ac = self.alphas_cumprod.tolist()  # Python floats (float64) for the coefficient algebra
        self._place_tables("cpu")
        self.num_inference_steps = None
        self.timesteps = None

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def clip_range(self) -> float | None:
        return float(self.config.clip_sample_range) if self.config.clip_sample else None

    def _place_tables(self, device) -> None:
        ac = self.alphas_cumprod
        self.alphas_cumprod_device = ac.to(device=device, dtype=torch.float32)
        self.sqrt_alphas_cumprod = ac.sqrt().to(device=device, dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt().to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ set_timesteps

    def _set_grid(self, num_inference_steps, device, **settings) -> None:
        """Timesteps, coefficient table and noise streams for ``num_inference_steps`` (rows from _coeff_row).

        ``settings`` (e.g. DDIM's eta) become attributes first; on any error the scheduler is left as it was.
        """
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        timesteps = make_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset)
        saved = dict(self.__dict__)
        try:
            self.__dict__.update(settings)
            self.num_inference_steps = n
            self._timesteps = timesteps  # host copy: step() maps a timestep to its row without reading the device
            self._index = {t: i for i, t in enumerate(timesteps)}
            self._rows = [self._coeff_row(i) for i in range(len(timesteps))]
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        device = torch.device("cpu") if device is None else torch.device(device)
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device)
        self.coeffs = torch.tensor(self._rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
        self.noise_streams = torch.tensor([ops.step_stream(t) for t in timesteps], dtype=torch.int32, device=device)
        self.needs_noise = any(row[-1] > 0 for row in self._rows)
        self._place_tables(device)

    def _prev_alpha_prod(self, prev_t: int, final: float) -> float:
        return self._ac[prev_t] if prev_t >= 0 else final

    # ------------------------------------------------------------------ step

    def _check_ready(self) -> None:
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")

    def index_of(self, timestep) -> int:
        """Row of ``timestep`` (int, or a 0-dim tensor: on the CPU, or an element of ``.timesteps``); no sync."""
        self._check_ready()
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point() or timestep.is_complex():
                raise ValueError(f"timestep must be an integer scalar, got a {timestep.dtype} tensor of shape "
                                 f"{tuple(timestep.shape)}")
            if timestep.device.type != "cpu":
                i = self._view_index(timestep)
                if i is None:
                    raise ValueError(f"timestep is a {timestep.device} tensor that is not an element of .timesteps; "
                                     "pass an int (or use step_at with a step index) to avoid reading the device")
                return i
            timestep = timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
            raise ValueError(f"timestep must be an integer, got {timestep!r}")
        i = self._index.get(int(timestep))
        if i is None:
            ts = self._timesteps
            raise ValueError(f"timestep {int(timestep)} is not in this schedule ({len(ts)} steps, {ts[0]}..{ts[-1]})")
        return i

    def _view_index(self, t: torch.Tensor) -> int | None:
        """Position of ``t`` in ``.timesteps`` if it is a view of one of its elements (read from metadata only)."""
        ts = self.timesteps
        if t._base is not ts:  # a view made by indexing or iterating .timesteps has it as its base
            return None
        i, rem = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0))
        return i if rem == 0 and 0 <= i < ts.shape[0] else None

    def _update(self, model_output, sample, i: int, row=None, noise=None, seeds=None) -> torch.Tensor:
        """Run the fused update for row ``i`` (or a host-computed ``row`` replacing it) with host-side noise choice."""
        coeffs, index, streams = self.coeffs, i, self.noise_streams
        noise_std = self._rows[i][-1] if row is None else row[-1]
        if row is not None:
            coeffs = torch.tensor([row], dtype=torch.float64).to(device=sample.device, dtype=torch.float32)
            index, streams = 0, self.noise_streams[i:i + 1]
        if noise_std == 0.0:
            seeds = None  # nothing to draw (noise, if given, is still passed so its shape is checked)
        elif noise is None and seeds is None:
            noise = torch.randn_like(sample)
        return ops.update_step(sample, model_output, coeffs, index, clip_range=self.clip_range, noise=noise,
                               seeds=seeds, noise_streams=streams if seeds is not None else None,
                               backend=self.backend)

    def step_at(self, model_output: torch.Tensor, step_index, sample: torch.Tensor, *, noise=None,
                seeds=None, out=None) -> torch.Tensor:
        """x_{t-1} from row ``step_index`` (int or integer device tensor) of ``.coeffs``; no host sync.

        Capturable in a CUDA graph: no ``.item()``, no branch on a device value, one output allocation.
        Noise: ``noise`` (like sample), or ``seeds`` (int64 [N]) for Philox noise from ``.noise_streams``;
        a schedule that adds noise (``.needs_noise``) requires one of them. ``out``: where to write
        x_{t-1} (``sample`` itself updates the sample in place).
        """
        self._check_ready()
        if noise is None and seeds is None and self.needs_noise:
            raise ValueError(f"{type(self).__name__}.step_at: this schedule adds noise; pass noise= or seeds=")
        return ops.update_step(sample, model_output, self.coeffs, step_index, clip_range=self.clip_range,
                               noise=noise, seeds=seeds, noise_streams=self.noise_streams if seeds is not None else None,
                               backend=self.backend, out=out)

    # ------------------------------------------------------------------ forward process and img2img

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) noise (Ho et al., 2020, eq. 4), on the device.

        ``timesteps``: an int, or an integer tensor with one timestep per sample (or one for all).
        Computed in float32 from float64 tables; returned in ``original_samples``' dtype.
        """
        x0 = original_samples
        if noise.shape != x0.shape:
            raise ValueError(f"add_noise: noise shape {tuple(noise.shape)} != sample shape {tuple(x0.shape)}")
        T = self.config.num_train_timesteps
        if not isinstance(timesteps, torch.Tensor):
            if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral):
                raise ValueError(f"add_noise: timesteps must be an int or an integer tensor, got {timesteps!r}")
            timesteps = torch.tensor([int(timesteps)], dtype=torch.int64)
        if timesteps.is_floating_point() or timesteps.is_complex():
            raise ValueError(f"add_noise: timesteps must be integers, got {timesteps.dtype}")
        if timesteps.numel() not in (1, x0.shape[0]):
            raise ValueError(f"add_noise: {timesteps.numel()} timesteps for {x0.shape[0]} samples")
        if timesteps.device.type == "cpu" and ((timesteps < 0) | (timesteps >= T)).any():
            raise ValueError(f"add_noise: timesteps must lie in [0, {T - 1}]")
        if self.sqrt_alphas_cumprod.device != x0.device:
            self._place_tables(x0.device)
        t = timesteps.to(x0.device).reshape(-1)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        sqrt_a = self.sqrt_alphas_cumprod[t].reshape(shape)
        sqrt_b = self.sqrt_one_minus_alphas_cumprod[t].reshape(shape)
        return (sqrt_a * x0.float() + sqrt_b * noise.float()).to(x0.dtype)

    def img2img_start(self, strength) -> int:
        """Index into ``.timesteps`` where image-to-image denoising starts: n - min(int(n * strength), n)."""
        self._check_ready()
        return img2img_start(self.num_inference_steps, strength)

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_diffusers_config(cls, config: dict, backend=None):
        """Build from a diffusers scheduler config dict; unused keys are ignored, unsupported values raise."""
        if config.get("thresholding"):
            raise ValueError(f"{cls.__name__}: thresholding=True (dynamic thresholding) is not supported")
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        kwargs = {k: v for k, v in config.items() if k in names}
        return cls(**kwargs, backend=backend)

    def to_diffusers_config(self) -> dict:
        """This configuration as a diffusers scheduler config dict (``_class_name`` included)."""
        d = dataclasses.asdict(self.config)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return {"_class_name": self.diffusers_class_name, **d, "thresholding": False}

    def __repr__(self) -> str:
        steps = f", {self.num_inference_steps} steps" if self.num_inference_steps else ""
        return f"{type(self).__name__}({self.config}{steps})"
