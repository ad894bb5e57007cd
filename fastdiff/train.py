"""Training a UNet by denoising score matching (Ho et al., 2020, Algorithm 1), with EMA weights.

One step: draw a batch x_0 (with replacement), timesteps t ~ U{0..T-1} and noise eps ~ N(0, I); noise the
batch to x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (``scheduler.add_noise``); regress the model output
on the target of the prediction type (eps, x_0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0) with a mean
squared error; AdamW; update the EMA copy of the weights.

All randomness of a step (batch, timesteps, noise) comes from one CPU generator, and dropout from torch's
global generator; both states go into every checkpoint, so ``resume`` continues bit-exactly on the same
machine: a run interrupted at a checkpoint and resumed ends with the same weights as an uninterrupted one.

Layout of ``out``::

    checkpoints/step_000500/   model/ + ema/ (fastdiff checkpoints), training_state.safetensors (optimizer
                               tensors, RNG states), training_state.json (config, step, optimizer settings,
                               loss history); written to a temporary folder, then renamed
    checkpoints/latest         name of the newest complete checkpoint (replaced atomically)
    model/                     the EMA weights at the end, with the scheduler settings: what to sample from
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from .cli import _Parser, bool_list, positive_int_list, seed_int
from .data import load_dataset
from .devices import resolve_device
from .fileio import atomic_write, atomic_write_text, make_temp_dir, remove_stale_temporaries

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
STATE_VERSION = 1
TEMP_STEP_PREFIX = ".tmp-step_"  # a checkpoint folder being written (renamed to step_NNNNNN when complete)
_STEP_NAME = re.compile(r"step_\d{6,}")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint."""

    # data and output
    data: str = "digits"  # "digits" (scikit-learn's 8x8 digits, train split) or a folder of images
    out: str = "runs/digits"  # output folder (checkpoints/, model/)
    image_size: int = 16  # training resolution; digits are upsampled bilinearly from 8x8
    image_channels: int | None = None  # 1 or 3; None: 1 for digits, from the files for a folder
    hflip: bool = False  # random horizontal flips (never for digits: a flipped digit is another glyph)
    # model (the classic parameterisation: level i has ch_mults[i] * n_channels channels)
    n_channels: int = 32
    ch_mults: tuple[int, ...] = (1, 2, 2)
    is_attn: tuple[bool, ...] = (False, False, True)  # self-attention at the lowest resolution only
    n_blocks: int = 1  # ResBlocks per down level (the up path has one more)
    norm_groups: int = 8  # GroupNorm groups; must divide every level's channel count
    dropout: float = 0.0  # ResBlock dropout; short runs on small data learn faster without it
    # noise schedule (stored with the model, so sampling uses the same one)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear (DDPM), scaled_linear, squaredcos_cap_v2 (cosine)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # epsilon, sample or v_prediction
    # optimisation
    steps: int = 4000  # total optimiser steps
    batch_size: int = 64
    lr: float = 1e-3  # AdamW learning rate, constant after warm-up (so a run can be extended exactly)
    warmup_steps: int = 200  # linear learning-rate warm-up from 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA of the weights; effective decay min(ema_decay, (1 + s) / (10 + s))
    # bookkeeping
    checkpoint_every: int = 500  # steps between resumable checkpoints (and at the end)
    log_every: int = 50  # steps per entry of the loss history stored in checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest checkpoint in `out`
    overwrite: bool = False  # replace an earlier run in `out` (its checkpoints/ and model/); else refuse
    seed: int = 0  # seeds the initial weights and every random draw
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    progress: bool = True  # tqdm progress bar with the running loss

    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("steps", "batch_size", "image_size", "n_channels", "n_blocks", "norm_groups",
                     "num_train_timesteps", "checkpoint_every", "log_every", "keep_checkpoints"):
            positive(name)
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if len(self.ch_mults) != len(self.is_attn):
            raise ValueError(f"is_attn has {len(self.is_attn)} entries for {len(self.ch_mults)} levels of ch_mults")
        if self.image_channels not in (None, 1, 3):
            raise ValueError(f"image_channels must be 1, 3 or None, got {self.image_channels!r}")
        factor = 2 ** (len(self.ch_mults) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {factor} "
                             f"(2 ** (levels - 1) for {len(self.ch_mults)} levels)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mults"], d["is_attn"] = list(self.ch_mults), list(self.is_attn)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for key in ("ch_mults", "is_attn"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def scheduler_config(self) -> dict:
        """The noise schedule as a diffusers-style scheduler config (what ``"scheduler"`` in config.json holds)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "clip_sample": True,  # the data lie in [-1, 1]
            "clip_sample_range": 1.0,
        }

    def unet_config(self, image_channels: int):
        from .unet import UNetConfig

        return UNetConfig.classic(n_channels=self.n_channels, ch_mults=tuple(self.ch_mults),
                                  is_attn=tuple(self.is_attn), n_blocks=self.n_blocks,
                                  image_channels=image_channels, image_size=self.image_size,
                                  norm_num_groups=self.norm_groups, dropout=self.dropout)


# Fields that fix the model, the data or the random streams: a resumed run must not change them.
_FROZEN_ON_RESUME = ("data", "image_size", "image_channels", "hflip", "n_channels", "ch_mults", "is_attn",
                     "n_blocks", "norm_groups", "dropout", "num_train_timesteps", "beta_schedule", "beta_start",
                     "beta_end", "prediction_type", "batch_size", "seed", "warmup_steps")


# ----------------------------------------------------------------------------------------------------
# Pieces of a step
# ----------------------------------------------------------------------------------------------------


def make_scheduler(config: TrainConfig):
    from .schedulers import DDPMScheduler

    return DDPMScheduler.from_diffusers_config(config.scheduler_config())


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor):
    """What the model learns to output: eps, x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho, 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a = abar_t.reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (step counts from 0)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(config: TrainConfig, step: int) -> float:
    """Short EMA memory early on (the first weights are random), up to ``ema_decay``."""
    return min(config.ema_decay, (1.0 + step) / (10.0 + step))


def draw_batch(images: torch.Tensor, config: TrainConfig, gen: torch.Generator):
    """(x0, timesteps, noise) for one step, all from ``gen`` on the CPU."""
    idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen)
    x0 = images[idx]
    if config.hflip:
        flip = torch.rand(config.batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, t, noise


def loss_on_batch(model, scheduler, x0, t, noise, prediction_type: str) -> torch.Tensor:
    """Mean squared error between the model output on x_t and the target of ``prediction_type``."""
    x_t = scheduler.add_noise(x0, noise, t)
    abar = scheduler.alphas_cumprod.to(x0.device)[t.to(x0.device)].to(x0.dtype)
    target = training_target(prediction_type, x0, noise, abar)
    return F.mse_loss(model(x_t, t), target)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state as flat tensors ("state.<param>.<name>") plus the JSON-safe rest."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {name} of parameter {pid} is not a tensor")
            tensors[f"optimizer.state.{pid}.{name}"] = value.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            pid, name = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(gen: torch.Generator) -> dict:
    out = {"rng.batch": gen.get_state(), "rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _restore_rng(gen: torch.Generator, tensors: dict) -> None:
    gen.set_state(tensors["rng.batch"])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step_{step:06d}")


def save_training_checkpoint(out: str, step: int, config: TrainConfig, model, ema, opt, gen,
                             loss_history: list) -> str:
    """Write a complete resumable checkpoint into a temporary folder, rename it, then point ``latest`` at it."""
    from safetensors.torch import save_file

    from .checkpoint import save_checkpoint

    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = checkpoint_dir(out, step)
    tmp = make_temp_dir(root, prefix=f"{TEMP_STEP_PREFIX}{step:06d}-")
    try:
        save_checkpoint(model, os.path.join(tmp, "model"), extra_metadata={"scheduler": config.scheduler_config()})
        save_checkpoint(ema, os.path.join(tmp, "ema"), extra_metadata={"scheduler": config.scheduler_config()})
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        state_tensors = {**opt_tensors, **_rng_tensors(gen)}
        atomic_write(os.path.join(tmp, "training_state.safetensors"), lambda path: save_file(state_tensors, path))
        meta = {"version": STATE_VERSION, "step": step, "config": config.to_dict(), "optimizer": opt_meta,
                "loss_history": loss_history}
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
    _prune(root, config.keep_checkpoints, keep=os.path.basename(final))
    return final


def _prune(root: str, keep_n: int, keep: str) -> None:
    steps = sorted(n for n in os.listdir(root) if n.startswith("step_") and os.path.isdir(os.path.join(root, n)))
    for name in steps[:-keep_n]:
        if name != keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder under ``out``, or None; ValueError naming a corrupt ``latest``."""
    root = os.path.join(out, "checkpoints")
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        try:
            with open(pointer) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {pointer} ({exc}); "
                             "remove it to resume from the newest step folder") from None
        if not _STEP_NAME.fullmatch(name):
            raise ValueError(f"{pointer} does not name a checkpoint (step_NNNNNN), it holds {name[:40]!r}; "
                             "remove it to resume from the newest step folder")
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "training_state.json")):
            return path
    if not os.path.isdir(root):
        return None
    done = sorted(n for n in os.listdir(root)
                  if _STEP_NAME.fullmatch(n) and os.path.isfile(os.path.join(root, n, "training_state.json")))
    return os.path.join(root, done[-1]) if done else None


def _read_state(ckpt: str) -> tuple[dict, dict]:
    """(training_state.json, training_state.safetensors) of a checkpoint; ValueError naming a file that is corrupt."""
    from safetensors.torch import load_file

    path = os.path.join(ckpt, "training_state.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not {"step", "config", "optimizer", "loss_history"} <= set(meta):
            raise ValueError("not a fastdiff training state")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot resume from {path}: {str(exc).splitlines()[0]}") from None
    path = os.path.join(ckpt, "training_state.safetensors")
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError for a truncated or corrupt file
        raise ValueError(f"cannot resume from {path}: {str(exc).splitlines()[0] or type(exc).__name__} "
                         "(truncated or corrupt)") from None
    return meta, tensors


def existing_run(out: str) -> int | None:
    """The step a training run in ``out`` reached (0 when it has output but no checkpoint), or None if there is none."""
    root = os.path.join(out, "checkpoints")
    steps = sorted(n for n in os.listdir(root) if _STEP_NAME.fullmatch(n)) if os.path.isdir(root) else []
    if steps:
        return int(steps[-1][len("step_"):])
    return 0 if os.path.isdir(os.path.join(out, "model")) else None


def _clear_run(out: str) -> None:
    for name in ("checkpoints", "model"):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)


def _remove_stale_temporaries(out: str) -> None:
    """Leftovers of a killed run: checkpoint folders still being written, half-written files."""
    root = os.path.join(out, "checkpoints")
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(TEMP_STEP_PREFIX) and os.path.isdir(os.path.join(root, name)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        remove_stale_temporaries(root, r"latest")
    remove_stale_temporaries(os.path.join(out, "model"), r"model\.safetensors|config\.json")


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train(config: TrainConfig, stop_at: int | None = None) -> str:
    """Train as ``config`` says; returns the folder of the final EMA model (``out/model``).

    ``stop_at``: stop after this many steps (writing a checkpoint), as if interrupted; a later call with
    ``resume=True`` continues. Used by the resume test.
    """
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, save_checkpoint
    from .unet import UNet

    config.validate()
    if config.resume and config.overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in out, or replace it")
    reached = existing_run(config.out)
    if reached is not None and not config.resume:
        if not config.overwrite:
            at = f" (at step {reached})" if reached else ""
            raise ValueError(f"{config.out} already holds a training run{at}; continue it with --resume, replace it "
                             "with --overwrite, or choose another --out")
        _clear_run(config.out)
    _remove_stale_temporaries(config.out)
    device = resolve_device(config.device)
    data = load_dataset(config.data, config.image_size, split="train", channels=config.image_channels)
    images = data.images
    channels = images.shape[1]
    scheduler = make_scheduler(config)

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = UNet(config.unet_config(channels)).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            betas=(0.9, 0.999), eps=1e-8)
    step, loss_history = 0, []

    if config.resume:
        ckpt = latest_checkpoint(config.out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {os.path.join(config.out, 'checkpoints')}")
        meta, tensors = _read_state(ckpt)
        stored = TrainConfig.from_dict(meta["config"])
        changed = [k for k in _FROZEN_ON_RESUME if getattr(stored, k) != getattr(config, k)]
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from the checkpoint in {ckpt}")
        model.load_state_dict(load_checkpoint(os.path.join(ckpt, "model"), device, torch.float32).state_dict())
        ema.load_state_dict(load_checkpoint(os.path.join(ckpt, "ema"), device, torch.float32).state_dict())
        _load_optimizer(opt, tensors, meta["optimizer"])
        _restore_rng(gen, tensors)
        step, loss_history = meta["step"], meta["loss_history"]

    start_step = step
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    model.train()
    running, running_n, smooth = 0.0, 0, None
    bar = tqdm(total=config.steps, initial=step, disable=not config.progress, unit="step",
               desc=f"train {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    start_time = time.time()
    try:
        while step < end:
            x0, t, noise = draw_batch(images, config, gen)
            x0, t, noise = x0.to(device), t.to(device), noise.to(device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, step)
            loss = loss_on_batch(model, scheduler, x0, t, noise, config.prediction_type)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            ema_update(ema, model, ema_decay_at(config, step))
            step += 1
            value = loss.item()
            running += value
            running_n += 1
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            if step % 10 == 0:
                bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
            if step % config.log_every == 0 or step == end:
                loss_history.append([step, running / running_n])
                running, running_n = 0.0, 0
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == end:
                save_training_checkpoint(config.out, step, config, model, ema, opt, gen, loss_history)
    finally:
        bar.close()
    elapsed = time.time() - start_time

    final = os.path.join(config.out, "model")
    if step >= config.steps and (step > start_step or not os.path.isdir(final)):
        save_checkpoint(ema.eval(), final, extra_metadata={
            "scheduler": config.scheduler_config(),
            "training": {"steps": step, "data": config.data, "seed": config.seed,
                         "final_loss": loss_history[-1][1] if loss_history else None,
                         "seconds_this_run": round(elapsed, 1), "config": config.to_dict()},
        })
    return final


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="fastdiff train", description="Train a UNet (DDPM objective, EMA weights).")
    p.add_argument("--data", default=d.data, help="'digits' or a folder of images")
    p.add_argument("--out", default=d.out, help="output folder (checkpoints/, model/)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate after warm-up")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay of the sampled weights")
    p.add_argument("--image-size", type=int, default=d.image_size, help="training resolution")
    p.add_argument("--image-channels", type=int, default=None, choices=(1, 3),
                   help="default: 1 for digits, from the files for a folder")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (not for digits)")
    p.add_argument("--n-channels", type=int, default=d.n_channels, help="channels of the first level")
    p.add_argument("--ch-mults", type=positive_int_list, default=d.ch_mults, help="channel multiplier per level")
    p.add_argument("--is-attn", type=bool_list, default=None, help="per level, e.g. 0,0,1 (default: last level)")
    p.add_argument("--n-blocks", type=int, default=d.n_blocks, help="ResBlocks per down level")
    p.add_argument("--norm-groups", type=int, default=d.norm_groups, help="GroupNorm groups")
    p.add_argument("--dropout", type=float, default=d.dropout, help="ResBlock dropout")
    p.add_argument("--num-train-timesteps", type=int, default=d.num_train_timesteps, help="T")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=d.beta_schedule, help="noise schedule")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=d.prediction_type, help="model target")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (its checkpoints/ and model/) instead of refusing")
    p.add_argument("--seed", type=seed_int, default=d.seed, help="initial weights and every random draw")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    is_attn = args.is_attn
    if is_attn is None:
        is_attn = tuple(i == len(args.ch_mults) - 1 for i in range(len(args.ch_mults)))
    return TrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, image_size=args.image_size,
        image_channels=args.image_channels, hflip=args.hflip, n_channels=args.n_channels,
        ch_mults=args.ch_mults, is_attn=is_attn, n_blocks=args.n_blocks, norm_groups=args.norm_groups,
        dropout=args.dropout, num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type, checkpoint_every=args.checkpoint_every, resume=args.resume,
        overwrite=args.overwrite, seed=args.seed, device=args.device, progress=not args.no_progress)


def _reached_step(out: str) -> int | None:
    ckpt = latest_checkpoint(out)
    return None if ckpt is None else _read_state(ckpt)[0]["step"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    start = time.time()
    before = _reached_step(config.out) if config.resume else None
    path = train(config)
    reached = _reached_step(config.out)
    if before is not None and before >= config.steps:
        print(f"the run in {config.out} is already at step {before}, past --steps {config.steps}: nothing trained, "
              f"the models are unchanged (raise --steps to continue); EMA model: {path}")
    else:
        note = f" (resumed from step {before})" if before is not None else ""
        print(f"reached step {reached}; this run{note} took {time.time() - start:.0f} s; EMA model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
