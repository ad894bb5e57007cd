"""Image-to-image: Sampler.sample(init=..., strength=...) against a plain loop written out here.

diffusers' img2img convention (StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents): with n inference
steps, the last int(n * strength) of the scheduler's timesteps are run; the init image is noised in closed form
to the first of them, x = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with eps the run's starting noise.
"""

import math

import pytest
import torch

from fastdiff import ops
from fastdiff.sampling import Sampler, image_seeds
from fastdiff.schedulers import DDIMScheduler, DDPMScheduler
from fastdiff.testing import assert_close
from tiny_models import tiny_unet


def tiny_model(seed=0):
    return tiny_unet(seed, channels=1).eval()  # random weights, zero-initialised layers perturbed


SCHEDULERS = {
    "ddim-eta0": (lambda: DDIMScheduler(num_train_timesteps=100), 0.0),
    "ddim-eta0.7": (lambda: DDIMScheduler(num_train_timesteps=100, timestep_spacing="trailing"), 0.7),
    "ddpm": (lambda: DDPMScheduler(num_train_timesteps=100), 0.0),
}


def plain_img2img(model, scheduler, init, seeds, steps, eta, strength):
    """The reference loop: diffusers' start index, closed-form noising at that timestep, the scheduler's steps."""
    scheduler.set_timesteps(steps, **({"eta": eta} if eta else {}))
    run = min(int(steps * strength), steps)  # denoising steps actually run
    timesteps = scheduler.timesteps.tolist()[steps - run:]
    shape = tuple(init.shape[1:])
    eps = ops.gaussian_noise(seeds, ops.INITIAL_NOISE_STREAM, shape)  # the run's starting noise
    abar = float(scheduler.alphas_cumprod[timesteps[0]])  # float64 table of the training schedule
    x = math.sqrt(abar) * init.expand(len(seeds), *shape) + math.sqrt(1.0 - abar) * eps
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(model(x, t), t, x, **({"eta": eta} if eta else {}),
                               seeds=seeds if scheduler.needs_noise else None).prev_sample
    return x, timesteps


@pytest.mark.parametrize("strength", [0.3, 0.55])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_equals_closed_form_noising_then_the_schedule_tail(name, strength):
    make, eta = SCHEDULERS[name]
    model = tiny_model(3)
    init = torch.rand(1, 1, 8, 8) * 2 - 1
    seeds = image_seeds(11, range(3))
    expected, timesteps = plain_img2img(model, make(), init, seeds, 10, eta, strength)
    assert len(timesteps) == int(10 * strength)
    calls = []
    got = Sampler(model, make(), backend="reference").sample(seeds, steps=10, eta=eta, init=init, strength=strength,
                                                             on_step=lambda: calls.append(1))
    assert len(calls) == len(timesteps)
    assert_close(got, expected, torch.float32, what=f"img2img {name} strength {strength} vs the plain loop")


def test_img2img_with_one_init_image_per_seed():
    model = tiny_model(4)
    init = torch.rand(2, 1, 8, 8) * 2 - 1
    seeds = image_seeds(5, range(2))
    expected, _ = plain_img2img(model, DDIMScheduler(num_train_timesteps=100), init, seeds, 8, 0.0, 0.5)
    got = Sampler(model, DDIMScheduler(num_train_timesteps=100), backend="reference").sample(
        seeds, steps=8, init=init, strength=0.5)
    assert_close(got, expected, torch.float32, what="img2img, one init per seed")

