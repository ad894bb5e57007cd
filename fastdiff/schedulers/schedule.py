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
from fastdiff.randn import randn_tensor

from .protocol import ConfigProtocol, SchedulerConfig, SchedulerOutput

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


def x0_and_eps_coeffs(prediction_type: str, alpha_prod_t: float) -> tuple[float, float, float, float, float, float]:
    """(x0_from_x, x0_from_m, x0_scale, eps_from_x, eps_from_m, eps_scale): x0 = (x0_from_x x + x0_from_m m)
    x0_scale and eps = (eps_from_x x + eps_from_m m) eps_scale from x_t and the model output m.

    With a = alphas_cumprod[t], b = 1 - a (x_t = sqrt(a) x0 + sqrt(b) eps, Ho et al., 2020, eq. 4):
    epsilon: x0 = (x - sqrt(b) m) / sqrt(a) (eq. 15), eps = m; sample: x0 = m, eps = (x - sqrt(a) m) / sqrt(b);
    v_prediction (Salimans & Ho, 2022, sec. 4): x0 = sqrt(a) x - sqrt(b) m, eps = sqrt(b) x + sqrt(a) m.
    Subtraction before scaling, as diffusers computes it: near t = T (a ~ 1e-9) x - sqrt(b) m cancels to
    ~sqrt(a) x0, and rounding x / sqrt(a) and m sqrt(b) / sqrt(a) separately would lose that difference.
    """
    a = alpha_prod_t
    b = 1.0 - a
    if prediction_type == "epsilon":
        if a == 0.0:
            raise ValueError("alphas_cumprod[t] = 0 (zero terminal SNR): an epsilon-prediction model cannot give x0 "
                             "there; use prediction_type 'v_prediction' or 'sample', or leading spacing")
        return 1.0, -math.sqrt(b), 1.0 / math.sqrt(a), 0.0, 1.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1.0, 1.0, -math.sqrt(a), 1.0 / math.sqrt(b)
    if prediction_type == "v_prediction":
        return math.sqrt(a), -math.sqrt(b), 1.0, math.sqrt(b), math.sqrt(a), 1.0
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def img2img_start(num_inference_steps: int, strength) -> int:
    """Index into the timesteps where image-to-image denoising starts (as diffusers' img2img pipelines)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    n = num_inference_steps
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0)



def check_custom_timesteps(timesteps, num_train_timesteps: int) -> list[int]:
    """A user's timestep list (as diffusers' DDPM ``set_timesteps(timesteps=...)``): integers, strictly descending,
    within [0, num_train_timesteps)."""
    if isinstance(timesteps, torch.Tensor):
        if timesteps.is_floating_point() or timesteps.is_complex():
            raise ValueError(f"custom timesteps must be integers, got a {timesteps.dtype} tensor")
        timesteps = timesteps.tolist()
    values = list(timesteps)
    if not values:
        raise ValueError("custom timesteps: the list is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"custom timesteps must be integers, got {v!r}")
    ts = [int(v) for v in values]
    if any(later >= earlier for earlier, later in zip(ts, ts[1:])):
        raise ValueError(f"custom timesteps must be in strictly descending order, got {ts}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps="
                         f"{num_train_timesteps}), got {ts[0]}..{ts[-1]}")
    return ts


# ----------------------------------------------------------------------------------------------------
# Common scheduler machinery
# ----------------------------------------------------------------------------------------------------

_NOISE_STD = ops.STEP_COEFFS.index("noise_std")
# Columns set so that the update op returns the predicted (clipped) x0 itself: prev = 1 * x0.
_X0_ONLY = {"eps_from_x": 0.0, "eps_from_m": 0.0, "eps_from_x0": 0.0, "prev_from_x0": 1.0, "prev_from_eps": 0.0,
            "prev_from_x": 0.0, "noise_std": 0.0}


def x0_table(coeffs: torch.Tensor) -> torch.Tensor:
    """``coeffs`` with every row rewritten to output x0: the update op on it gives diffusers' pred_original_sample
    through the same x0 arithmetic (and the same clipping) as the step itself."""
    table = coeffs.clone()
    for name, value in _X0_ONLY.items():
        table[:, ops.STEP_COEFFS.index(name)] = value
    return table


class SchedulerBase(ConfigProtocol):
    """What DDPM and DDIM share: schedule, timesteps, device buffers, diffusers' step protocol, add_noise.

    Subclasses define ``config_class`` (a dataclass whose fields are diffusers' ``__init__`` arguments, in
    diffusers' order), ``diffusers_class_name``, ``_coeff_row(i) -> list[float]`` (row ``i`` of the STEP_COEFFS
    table, float64) and may check their own config fields in ``_validate_extra``.

    Two ways to step: ``step`` is diffusers' (a timestep, noise from a ``torch.Generator``, returns
    ``SchedulerOutput``); ``step_at`` is fastdiff's capturable one (a step index, possibly a device tensor, and
    per-image Philox noise from ``seeds``), which the Sampler runs.
    """

    config_class: type
    diffusers_class_name: str
    steps_without_set_timesteps = False  # True: before set_timesteps, step over every training timestep

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "diffusers_class_name" in cls.__dict__:
            ConfigProtocol._registry.append(cls)

    @staticmethod
    def _validate_extra(config) -> None:
        pass

    def _setup(self, arguments: dict) -> None:
        """Validate and store the constructor's ``arguments`` (its ``locals()``: diffusers' keyword arguments,
        ``backend`` and the catch-all ``private_kwargs``)."""
        name = type(self).__name__
        self._reject_public_kwargs(name, arguments.get("private_kwargs") or {})
        c = self.config_class(**{f.name: arguments[f.name] for f in dataclasses.fields(self.config_class)})
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
        if c.thresholding:
            raise ValueError(f"{name}: thresholding=True (dynamic thresholding) is not supported")
        self._validate_extra(c)
        if c.trained_betas is not None:
            c.trained_betas = [float(b) for b in c.trained_betas]
        self.config = SchedulerConfig(dataclasses.asdict(c))
        self.backend = ops.check_backend(arguments["backend"]) if arguments.get("backend") is not None else None
        self.init_noise_sigma = 1.0
        betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
                           c.rescale_betas_zero_snr)
        self.betas = betas  # float64 host
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)  # float64 host: alpha-bar_t
        self._ac = self.alphas_cumprod.tolist()  # Python floats (float64) for the coefficient algebra
        self._place_tables("cpu")
        # diffusers' state before set_timesteps: every training timestep, no inference steps chosen
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._timesteps = None  # host copy of the grid the table was built for (None: no table yet)

    @property
    def clip_range(self) -> float | None:
        return float(self.config.clip_sample_range) if self.config.clip_sample else None

    def _place_tables(self, device) -> None:
        ac = self.alphas_cumprod
        self.alphas_cumprod_device = ac.to(device=device, dtype=torch.float32)
        self.sqrt_alphas_cumprod = ac.sqrt().to(device=device, dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt().to(device=device, dtype=torch.float32)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model input for ``timestep``: ``sample`` unchanged (DDPM and DDIM do not scale it)."""
        return sample

    # ------------------------------------------------------------------ set_timesteps

    def _grid_from_arguments(self, num_inference_steps, timesteps, custom_allowed: bool):
        """(timesteps, num_inference_steps, custom) for set_timesteps' arguments, diffusers' rules."""
        name = type(self).__name__
        T = self.config.num_train_timesteps
        if timesteps is not None:
            if not custom_allowed:
                raise ValueError(f"{name}.set_timesteps: custom timesteps are not supported (this scheduler steps "
                                 f"from t to t - num_train_timesteps // num_inference_steps); pass num_inference_steps")
            if num_inference_steps is not None:
                raise ValueError(f"{name}.set_timesteps: pass either num_inference_steps or timesteps, not both")
            ts = check_custom_timesteps(timesteps, T)
            return ts, len(ts), True
        if num_inference_steps is None:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be a positive integer, got None"
                             + (" (or pass timesteps=[...])" if custom_allowed else ""))
        n = check_num_inference_steps(num_inference_steps, T)
        return make_timesteps(n, T, self.config.timestep_spacing, self.config.steps_offset), n, False

    def _set_grid(self, timesteps: list[int], device, *, num_inference_steps, custom=False, tolerant=False,
                  timesteps_tensor=None, **settings) -> None:
        """Coefficient table ``.coeffs`` (rows from _coeff_row) and ``.noise_streams`` for the grid ``timesteps``.

        ``settings`` (e.g. DDIM's eta) become attributes first; on any error the scheduler is left as it was.
        ``tolerant``: a row that cannot be computed (zero terminal SNR with epsilon prediction) is stored as NaN
        and its error raised only when that timestep is stepped (the implicit every-timestep grid of DDPM).
        """
        saved = dict(self.__dict__)
        try:
            self.__dict__.update(settings)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = custom
            self._timesteps = timesteps  # host copy: step() maps a timestep to its row without reading the device
            self._index = {t: i for i, t in enumerate(timesteps)}
            rows, errors = [], {}
            for i in range(len(timesteps)):
                try:
                    rows.append(self._coeff_row(i))
                except ValueError as exc:
                    if not tolerant:
                        raise
                    errors[i] = str(exc)
                    rows.append(None)
            width = len(next((r for r in rows if r is not None), ops.STEP_COEFFS))
            self._rows = [r if r is not None else [math.nan] * width for r in rows]
            self._row_errors = errors
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        device = torch.device("cpu") if device is None else torch.device(device)
        if timesteps_tensor is None:
            timesteps_tensor = torch.tensor(timesteps, dtype=torch.int64, device=device)
        self.timesteps = timesteps_tensor
        self._coeffs = torch.tensor(self._rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
        self._noise_streams = torch.tensor([ops.step_stream(t) for t in timesteps], dtype=torch.int32, device=device)
        self._needs_noise = any(row[_NOISE_STD] > 0 for row in self._rows)  # NaN rows compare False
        self._tables = {}  # per-device copies for step() (coeffs, noise streams, x0 table)
        self._place_tables(device)

    def _prev_alpha_prod(self, prev_t: int, final: float) -> float:
        return self._ac[prev_t] if prev_t >= 0 else final

    # ------------------------------------------------------------------ the table

    def _check_ready(self) -> None:
        if self._timesteps is not None:
            return
        if not self.steps_without_set_timesteps:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")
        # DDPM before set_timesteps: every training timestep T-1..0, as diffusers' DDPMScheduler steps
        self._set_grid(self.timesteps.tolist(), self.timesteps.device, num_inference_steps=None, tolerant=True,
                       timesteps_tensor=self.timesteps)

    @property
    def coeffs(self) -> torch.Tensor:
        """float32 [steps, len(STEP_COEFFS)]: row i holds the update coefficients of ``timesteps[i]``."""
        self._check_ready()
        return self._coeffs

    @property
    def noise_streams(self) -> torch.Tensor:
        """int32 [steps]: the Philox stream of each step's noise (``ops.step_stream(t)``)."""
        self._check_ready()
        return self._noise_streams

    @property
    def needs_noise(self) -> bool:
        """Whether any step of the schedule adds noise (then step_at needs noise= or seeds=)."""
        self._check_ready()
        return self._needs_noise

    def _tables_on(self, device: torch.device):
        """(coeffs, noise_streams, x0 table) on ``device``; copies are made once per device."""
        tables = self._tables.get(device)
        if tables is None:
            coeffs = self._coeffs.to(device)
            tables = (coeffs, self._noise_streams.to(device), x0_table(coeffs))
            self._tables[device] = tables
        return tables

    # ------------------------------------------------------------------ step

    def _locate(self, timestep) -> tuple[int | None, int]:
        """(row of ``timestep`` or None if it is not in the grid, the timestep as an int); never reads the device."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point() or timestep.is_complex():
                raise ValueError(f"timestep must be an integer scalar, got a {timestep.dtype} tensor of shape "
                                 f"{tuple(timestep.shape)}")
            if timestep.device.type != "cpu":
                i = self._view_index(timestep)
                if i is None:
                    raise ValueError(f"timestep is a {timestep.device} tensor that is not an element of .timesteps; "
                                     "pass an int (or use step_at with a step index) to avoid reading the device")
                return i, self._timesteps[i]
            timestep = timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
            raise ValueError(f"timestep must be an integer, got {timestep!r}")
        t = int(timestep)
        return self._index.get(t), t

    def index_of(self, timestep) -> int:
        """Row of ``timestep`` (int, or a 0-dim tensor: on the CPU, or an element of ``.timesteps``); no sync."""
        self._check_ready()
        i, t = self._locate(timestep)
        if i is None:
            ts = self._timesteps
            raise ValueError(f"timestep {t} is not in this schedule ({len(ts)} steps, {ts[0]}..{ts[-1]})")
        return i

    def _view_index(self, t: torch.Tensor) -> int | None:
        """Position of ``t`` in ``.timesteps`` if it is a view of one of its elements (read from metadata only)."""
        ts = self.timesteps
        if t._base is not ts:  # a view made by indexing or iterating .timesteps has it as its base
            return None
        i, rem = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0))
        return i if rem == 0 and 0 <= i < ts.shape[0] else None

    def _step(self, model_output, sample, i: int | None, t: int, row, draws_noise: bool, *, generator=None,
              noise=None, seeds=None, return_dict=True):
        """diffusers' step: prev_sample and pred_original_sample from table row ``i`` (or the host ``row`` for t).

        Noise (only when ``draws_noise``, exactly when diffusers draws it): ``noise`` as given, else Philox noise
        from ``seeds``, else ``randn_tensor`` from ``generator`` (torch's global generator when None).
        """
        name = type(self).__name__
        for what, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}.step: {what} must be a torch.Tensor, got {type(value).__name__}")
        given = [k for k, v in (("generator", generator), ("noise", noise), ("seeds", seeds)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"{name}.step: pass only one of generator, variance_noise/noise and seeds "
                             f"(got {' and '.join(given)})")
        device = sample.device
        if row is None:
            if i in self._row_errors:
                raise ValueError(f"{name}.step at timestep {t}: {self._row_errors[i]}")
            coeffs, streams, x0_coeffs = self._tables_on(device)
            index = i
        else:
            coeffs = torch.tensor([row], dtype=torch.float64).to(device=device, dtype=torch.float32)
            streams = torch.tensor([ops.step_stream(t)], dtype=torch.int32, device=device)
            x0_coeffs, index = x0_table(coeffs), 0
        if not draws_noise:
            noise = seeds = None
        elif noise is None and seeds is None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        clip = self.clip_range
        prev = ops.update_step(sample, model_output, coeffs, index, clip_range=clip, noise=noise, seeds=seeds,
                               noise_streams=streams if seeds is not None else None, backend=self.backend)
        x0 = ops.update_step(sample, model_output, x0_coeffs, index, clip_range=clip, backend=self.backend)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    def step_at(self, model_output: torch.Tensor, step_index, sample: torch.Tensor, *, noise=None,
                seeds=None, out=None) -> torch.Tensor:
        """x_{t-1} from row ``step_index`` (int or integer device tensor) of ``.coeffs``; no host sync.

        Capturable in a CUDA graph: no ``.item()``, no branch on a device value, one output allocation.
        Noise: ``noise`` (like sample), or ``seeds`` (int64 [N]) for Philox noise from ``.noise_streams``;
        a schedule that adds noise (``.needs_noise``) requires one of them. ``out``: where to write
        x_{t-1} (``sample`` itself updates the sample in place).
        """
        self._check_ready()
        name = type(self).__name__
        if self._row_errors:
            first = min(self._row_errors)
            raise ValueError(f"{name}.step_at: timestep {self._timesteps[first]} of the every-timestep schedule "
                             f"cannot be stepped ({self._row_errors[first]}); call set_timesteps")
        if noise is None and seeds is None and self._needs_noise:
            raise ValueError(f"{name}.step_at: this schedule adds noise; pass noise= or seeds=")
        return ops.update_step(sample, model_output, self._coeffs, step_index, clip_range=self.clip_range,
                               noise=noise, seeds=seeds,
                               noise_streams=self._noise_streams if seeds is not None else None, backend=self.backend,
                               out=out)

    # ------------------------------------------------------------------ forward process and img2img

    def _alpha_terms(self, x: torch.Tensor, timesteps, what: str):
        """(sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t)) shaped to broadcast over ``x``, one timestep per sample."""
        T = self.config.num_train_timesteps
        if not isinstance(timesteps, torch.Tensor):
            if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral):
                raise ValueError(f"{what}: timesteps must be an int or an integer tensor, got {timesteps!r}")
            timesteps = torch.tensor([int(timesteps)], dtype=torch.int64)
        if timesteps.is_floating_point() or timesteps.is_complex():
            raise ValueError(f"{what}: timesteps must be integers, got {timesteps.dtype}")
        if timesteps.numel() not in (1, x.shape[0]):
            raise ValueError(f"{what}: {timesteps.numel()} timesteps for {x.shape[0]} samples")
        if timesteps.device.type == "cpu" and ((timesteps < 0) | (timesteps >= T)).any():
            raise ValueError(f"{what}: timesteps must lie in [0, {T - 1}]")
        t = timesteps.to(x.device).reshape(-1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        if x.dtype == torch.float64:  # a float64 caller gets float64 coefficients
            ac = self.alphas_cumprod.to(x.device)
            return ac.sqrt()[t].reshape(shape), (1.0 - ac).sqrt()[t].reshape(shape)
        if self.sqrt_alphas_cumprod.device != x.device:
            self._place_tables(x.device)
        return self.sqrt_alphas_cumprod[t].reshape(shape), self.sqrt_one_minus_alphas_cumprod[t].reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) noise (Ho et al., 2020, eq. 4), on the device.

        ``timesteps``: an int, or an integer tensor with one timestep per sample (or one for all).
        Computed in float32 (float64 for float64 input) from float64 tables; returned in ``original_samples``' dtype.
        """
        x0 = original_samples
        if noise.shape != x0.shape:
            raise ValueError(f"add_noise: noise shape {tuple(noise.shape)} != sample shape {tuple(x0.shape)}")
        sqrt_a, sqrt_b = self._alpha_terms(x0, timesteps, "add_noise")
        wide = sqrt_a.dtype
        return (sqrt_a * x0.to(wide) + sqrt_b * noise.to(wide)).to(x0.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(alpha-bar_t) noise - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho, 2022), the v-prediction target."""
        if noise.shape != sample.shape:
            raise ValueError(f"get_velocity: noise shape {tuple(noise.shape)} != sample shape {tuple(sample.shape)}")
        sqrt_a, sqrt_b = self._alpha_terms(sample, timesteps, "get_velocity")
        wide = sqrt_a.dtype
        return (sqrt_a * noise.to(wide) - sqrt_b * sample.to(wide)).to(sample.dtype)

    def img2img_start(self, strength) -> int:
        """Index into ``.timesteps`` where image-to-image denoising starts: n - min(int(n * strength), n)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before img2img_start")
        return img2img_start(self.num_inference_steps, strength)

