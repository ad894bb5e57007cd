"""The sampler: per-image reproducibility, the capturable step, image-to-image, output files, CUDA graphs."""

import os

import pytest
import torch

from fastdiff import ops
from fastdiff.sampling import LoopState, Sampler, generate, image_seed, image_seeds
from fastdiff.schedulers import DDIMScheduler, DDPMScheduler
from fastdiff.testing import assert_close
from fastdiff.unet import UNet, UNetConfig


def tiny_model(seed=0, channels=1, size=8):
    torch.manual_seed(seed)
    config = UNetConfig.classic(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                                image_channels=channels, image_size=size, norm_num_groups=4)
    model = UNet(config)
    with torch.no_grad():  # random, non-trivial weights everywhere (zero-initialised layers included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


SCHEDULERS = {
    "ddim-eta0": (lambda: DDIMScheduler(num_train_timesteps=100), 0.0),
    "ddim-eta0.5": (lambda: DDIMScheduler(num_train_timesteps=100), 0.5),
    "ddpm": (lambda: DDPMScheduler(num_train_timesteps=100), 0.0),
    "ddpm-vpred-fixed-large": (lambda: DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction",
                                                     variance_type="fixed_large"), 0.0),
}


# image_seed(s, i) as released: these are the seeds of images already generated, so they must never change.
KNOWN_IMAGE_SEEDS = {(0, 0): 8286242343226680935, (0, 1): 3043605876323429014, (7, 3): 8655840465400278221,
                     (1, 0): 7258340960826406041, (2**32 + 1, 0): 8480213964805160940,
                     (2**63 + 5, 17): 3822535131125750535, (2**64 - 1, 1000): 625251923604518944}


def test_image_seed_is_stable_and_distinct():
    assert {key: image_seed(*key) for key in KNOWN_IMAGE_SEEDS} == KNOWN_IMAGE_SEEDS
    seeds = {image_seed(s, i) for s in range(4) for i in range(64)}
    assert len(seeds) == 256 and all(0 <= s < 2**63 for s in seeds)
    assert image_seeds(7, [3]).tolist() == [image_seed(7, 3)]


def test_every_bit_of_the_base_seed_counts():
    """s and s + 2**32 (and s + 2**k for every other bit) are different runs: nothing truncates the seed."""
    for s in (0, 5, 2**32 - 1, 2**40 + 3):
        for bit in (31, 32, 33, 48, 63):
            if s + 2**bit < 2**64:
                assert image_seed(s, 0) != image_seed(s + 2**bit, 0), (s, bit)
    assert not set(image_seeds(9, range(16)).tolist()) & set(image_seeds(9 + 2**32, range(16)).tolist())


@pytest.mark.parametrize("bad", [-1, 2**64, 2**70, 1.5, True, "3", None])
def test_seeds_outside_the_range_are_refused(bad):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        image_seed(bad, 0)
    with pytest.raises(ValueError, match="seed"):
        image_seeds(bad, range(2))


def test_generate_refuses_a_bad_seed_before_any_work(tmp_path):
    sampler = Sampler(tiny_model(), DDIMScheduler(num_train_timesteps=100), backend="reference")
    with pytest.raises(ValueError, match="seed"):
        generate(sampler, num_images=2, batch_size=2, seed=-3, steps=3, out_dir=str(tmp_path / "x"), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_image_i_is_the_same_in_any_batch(name):
    make, eta = SCHEDULERS[name]
    sampler = Sampler(tiny_model(), make(), backend="reference")
    seeds = image_seeds(7, range(5))
    whole = sampler.sample(seeds, steps=6, eta=eta)
    parts = torch.cat([sampler.sample(seeds[:2], steps=6, eta=eta), sampler.sample(seeds[2:], steps=6, eta=eta)])
    single = sampler.sample(seeds[3:4], steps=6, eta=eta)
    assert_close(parts, whole, torch.float32, what="batches of 2 and 3 vs one batch of 5")
    assert_close(single, whole[3:4], torch.float32, what="batch of 1 vs batch of 5")
    assert (whole[0] - whole[1]).abs().max() > 1e-3, "different seeds must give different images"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_captured_step_run_eagerly_equals_the_plain_loop(name):
    """SamplingPlan.step on static buffers (what a CUDA graph captures) == a plain diffusers-style loop."""
    make, eta = SCHEDULERS[name]
    model = tiny_model(1)
    sampler = Sampler(model, make(), backend="reference")
    seeds = image_seeds(3, range(3))
    plan = sampler.plan(5, eta)
    x_init = ops.gaussian_noise(seeds, ops.INITIAL_NOISE_STREAM, (1, 8, 8))

    state = LoopState(x=x_init.clone(), seeds=seeds.clone(), step_index=torch.zeros((), dtype=torch.int64))
    for _ in range(plan.steps):
        plan.step(model, state)
    assert int(state.step_index) == plan.steps

    scheduler = make()
    scheduler.set_timesteps(5, **({"eta": eta} if eta else {}))
    x = x_init.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, **({"eta": eta} if eta else {}),
                               seeds=seeds if scheduler.needs_noise else None).prev_sample
    assert_close(state.x, x, torch.float32, what="static-buffer step vs plain loop")
    assert_close(sampler.sample(seeds, steps=5, eta=eta), x, torch.float32, what="Sampler.sample vs plain loop")


class HostSync(AssertionError):
    pass


def test_no_step_reads_a_device_value_back_to_the_host(monkeypatch):
    """Inside a step: no .item(), no bool/int/float of a tensor, no .tolist()/.cpu()/.numpy()."""
    model = tiny_model(2)
    for make, eta in SCHEDULERS.values():
        sampler = Sampler(model, make(), backend="reference")
        plan = sampler.plan(4, eta)
        state = LoopState(x=torch.randn(2, 1, 8, 8), seeds=image_seeds(0, range(2)),
                          step_index=torch.zeros((), dtype=torch.int64))
        plan.step(model, state)  # warm-up outside the guard (lazy initialisation may sync)

        def forbid(name):
            def raise_sync(*args, **kwargs):
                raise HostSync(f"Tensor.{name} called inside a sampling step")
            return raise_sync

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, forbid(name))
            with torch.no_grad():
                for _ in range(3):
                    plan.step(model, state)


def test_img2img_runs_the_tail_of_the_schedule_and_strength_zero_keeps_the_image():
    sampler = Sampler(tiny_model(3), DDIMScheduler(num_train_timesteps=100), backend="reference")
    init = torch.rand(1, 1, 8, 8) * 2 - 1
    seeds = image_seeds(0, range(2))
    calls = []
    out = sampler.sample(seeds, steps=10, init=init, strength=0.3, on_step=lambda: calls.append(1))
    assert len(calls) == 3 and out.shape == (2, 1, 8, 8)
    kept = sampler.sample(seeds, steps=10, init=init, strength=0.0)
    assert torch.equal(kept, init.expand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="strength"):
        sampler.sample(seeds, steps=10, init=init, strength=1.5)


def test_img2img_stays_closer_to_the_init_at_low_strength():
    sampler = Sampler(tiny_model(4), DDIMScheduler(num_train_timesteps=100), backend="reference")
    init = torch.rand(1, 1, 8, 8) * 2 - 1
    seeds = image_seeds(1, range(4))
    dist = [(sampler.sample(seeds, steps=10, init=init, strength=s) - init).pow(2).mean().item() for s in (0.1, 1.0)]
    assert dist[0] < dist[1]


def test_generate_writes_pngs_atomically_and_resumes(tmp_path):
    sampler = Sampler(tiny_model(5), DDIMScheduler(num_train_timesteps=100), backend="reference")
    out = str(tmp_path / "run")
    first = generate(sampler, num_images=5, batch_size=2, seed=0, steps=3, out_dir=out, progress=False)
    names = sorted(os.listdir(out))
    assert names == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "run.json"]
    assert len(first.written) == 5 and first.skipped == 0
    os.remove(os.path.join(out, "000003.png"))
    before = {n: open(os.path.join(out, n), "rb").read() for n in names
              if n not in ("grid.png", "000003.png", "run.json")}
    second = generate(sampler, num_images=5, batch_size=4, seed=0, steps=3, out_dir=out, progress=False)
    assert second.skipped == 4 and [os.path.basename(p) for p in second.written] == ["000003.png"]
    for n, data in before.items():
        assert open(os.path.join(out, n), "rb").read() == data, f"{n} was rewritten on resume"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_bad_arguments_are_rejected_before_any_work(tmp_path):
    sampler = Sampler(tiny_model(), DDIMScheduler(num_train_timesteps=100), backend="reference")
    for kwargs, match in (({"num_images": 0}, "num_images"), ({"batch_size": 0}, "batch_size"),
                          ({"steps": -3}, "steps")):
        args = dict(num_images=2, batch_size=2, seed=0, steps=3, out_dir=str(tmp_path / "x"), progress=False)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            generate(sampler, **args)
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


def test_cuda_graphs_refused_on_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        Sampler(tiny_model(), DDIMScheduler(num_train_timesteps=100), cuda_graphs=True)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_graph_replay_equals_eager_sampling(name, backend):
    make, eta = SCHEDULERS[name]
    model = tiny_model(6, channels=3, size=16)
    seeds = image_seeds(0, range(4))
    eager = Sampler(model, make(), device="cuda", backend=backend, cuda_graphs=False).sample(seeds, steps=8, eta=eta)
    graphed = Sampler(model, make(), device="cuda", backend=backend, cuda_graphs=True)
    first = graphed.sample(seeds, steps=8, eta=eta)
    second = graphed.sample(seeds, steps=8, eta=eta)
    assert graphed.graph_count == 1, "the second call must reuse the captured graph"
    assert torch.equal(first, second), "two replays of the same inputs must agree bit for bit"
    assert_close(first, eager, torch.float32, rtol=1e-4, what="graph replay vs eager")
    reference = Sampler(model, make(), device="cpu", backend="reference").sample(seeds.cpu(), steps=8, eta=eta)
    assert_close(first.cpu(), reference, torch.float32, rtol=1e-3, what="graph replay vs CPU reference")


@pytest.mark.gpu
def test_graph_sees_weights_changed_in_place_and_serves_smaller_batches():
    model = tiny_model(7, channels=3, size=16)
    sampler = Sampler(model, DDIMScheduler(num_train_timesteps=100), device="cuda", backend="auto")
    seeds = image_seeds(0, range(4))
    before = sampler.sample(seeds, steps=5)
    with torch.no_grad():
        sampler.model.conv_out.bias.add_(0.25)  # an in-place fine-tune
    after = sampler.sample(seeds, steps=5)
    eager = Sampler(sampler.model, DDIMScheduler(num_train_timesteps=100), device="cuda", backend="auto",
                    cuda_graphs=False).sample(seeds, steps=5)
    assert (after - before).abs().max() > 1e-3
    assert_close(after, eager, torch.float32, rtol=1e-4, what="replay after an in-place weight update")
    small = sampler.sample(seeds[:3], steps=5)
    assert sampler.graph_count == 1
    assert_close(small, after[:3], torch.float32, rtol=1e-4, what="smaller batch through the cached graph")
