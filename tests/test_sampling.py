"""The sampler: per-image reproducibility, the capturable step, image-to-image, output files, CUDA graphs."""

import os

import pytest
import torch

from fastdiff import ops
from fastdiff.sampling import LoopState, Sampler, generate, image_seed, image_seeds
from fastdiff.schedulers import DDIMScheduler, DDPMScheduler
from fastdiff.testing import assert_close
from tiny_models import tiny_unet


def tiny_model(seed=0, channels=1, size=8):
    return tiny_unet(seed, channels, size).eval()  # random weights, zero-initialised layers perturbed


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


# No host reads inside a step, for every scheduler and option: tests/test_capture_guard.py (a dispatch mode).


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
def test_graph_replay_equals_eager_sampling(name, backend, no_tf32):
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
    # TF32 off (no_tf32): float32 cuDNN/cuBLAS against the CPU differ by rounding only
    assert_close(first.cpu(), reference, torch.float32, rtol=1e-4, what="graph replay vs CPU reference")


@pytest.mark.gpu
def test_graph_sees_weights_changed_in_place_and_serves_smaller_batches(no_tf32):
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


@pytest.mark.gpu
def test_graph_cache_reuses_a_larger_graph_only_within_2x_and_shares_one_pool(no_tf32):
    from fastdiff.sampling import GRAPH_REUSE_MAX_FACTOR

    sampler = Sampler(tiny_model(8, channels=3, size=16), DDIMScheduler(num_train_timesteps=100), device="cuda",
                      backend="auto")
    seeds = image_seeds(0, range(4))
    full = sampler.sample(seeds, steps=3)
    assert GRAPH_REUSE_MAX_FACTOR == 2 and sampler.graph_count == 1
    three = sampler.sample(seeds[:3], steps=3)  # 4 <= 2 * 3: replays the batch-4 graph
    assert sampler.graph_count == 1
    one = sampler.sample(seeds[:1], steps=3)  # 4 > 2 * 1: a graph of its own, not 4x the work
    assert sampler.graph_count == 2
    two = sampler.sample(seeds[:2], steps=3)  # the smallest graph that fits within 2x: batch 4
    assert sampler.graph_count == 2
    batches = sorted(key[1][0] for key in sampler._graphs)
    assert batches == [1, 4]
    pools = {loop.graph.pool() for loop in sampler._graphs.values()}
    assert pools == {sampler._graph_pool}, "every graph draws from the sampler's one memory pool"
    for got, n in ((three, 3), (one, 1), (two, 2)):
        assert_close(got, full[:n], torch.float32, rtol=1e-4, what=f"batch {n} through the cache")


@pytest.mark.gpu
def test_replaced_weights_make_the_next_call_capture_again(no_tf32):
    model = tiny_model(9, channels=3, size=16)
    sampler = Sampler(model, DDIMScheduler(num_train_timesteps=100), device="cuda", backend="auto")
    seeds = image_seeds(0, range(2))
    sampler.sample(seeds, steps=3)
    loop = next(iter(sampler._graphs.values()))
    other = tiny_model(10, channels=3, size=16).cuda()
    sampler.model.load_state_dict(other.state_dict(), assign=True)  # new tensors: the old graph reads stale memory
    got = sampler.sample(seeds, steps=3)
    assert sampler.graph_count == 1 and next(iter(sampler._graphs.values())) is not loop
    eager = Sampler(other, DDIMScheduler(num_train_timesteps=100), device="cuda", backend="auto",
                    cuda_graphs=False).sample(seeds, steps=3)
    assert_close(got, eager, torch.float32, rtol=1e-4, what="after load_state_dict(assign=True)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_defaults_channels_last_for_half_precision_and_cudnn_benchmark(dtype):
    torch.backends.cudnn.benchmark = False
    sampler = Sampler(tiny_model(11, channels=3, size=16), DDIMScheduler(num_train_timesteps=100), device="cuda",
                      dtype=dtype, backend="auto")
    assert torch.backends.cudnn.benchmark, "set before any warm-up so the captured convolutions are the tuned ones"
    half = dtype != torch.float32
    want = torch.channels_last if half else torch.contiguous_format
    assert sampler.memory_format == want
    assert sampler.model.conv_in.weight.is_contiguous(memory_format=want)
    out = sampler.sample(image_seeds(0, range(2)), steps=3)
    assert out.dtype == dtype and out.is_contiguous() and torch.isfinite(out.float()).all()
    loop = next(iter(sampler._graphs.values()))
    assert loop.state.x.is_contiguous(memory_format=want)
    nchw = Sampler(tiny_model(11, channels=3, size=16), DDIMScheduler(num_train_timesteps=100), device="cuda",
                   dtype=dtype, backend="auto", memory_format=torch.contiguous_format)
    assert nchw.model.conv_in.weight.is_contiguous()
    assert_close(out, nchw.sample(image_seeds(0, range(2)), steps=3), dtype, rtol=5 * RTOL_HALF.get(dtype, 1e-4),
                 what=f"channels_last vs NCHW, {dtype}")


RTOL_HALF = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def test_default_memory_format_is_channels_last_only_for_half_precision_on_cuda():
    from fastdiff.sampling import default_memory_format

    assert default_memory_format(torch.device("cpu"), torch.float32) == torch.contiguous_format
    assert default_memory_format(torch.device("cuda", 0), torch.float32) == torch.contiguous_format
    assert default_memory_format(torch.device("cuda", 0), torch.float16) == torch.channels_last
    assert default_memory_format(torch.device("cuda", 0), torch.bfloat16) == torch.channels_last


def test_cpu_sampling_runs_in_place_and_returns_nchw():
    sampler = Sampler(tiny_model(12), DDPMScheduler(num_train_timesteps=100), backend="reference")
    out = sampler.sample(image_seeds(0, range(2)), steps=3)
    assert sampler.memory_format == torch.contiguous_format and out.is_contiguous() and out.shape == (2, 1, 8, 8)
    assert sampler.plan(3)._update_in_place


def test_graph_cache_choice_reuses_only_within_2x_and_shares_one_pool(monkeypatch):
    """The cache's choice, checked on the CPU with a stand-in for the captured loop (which needs CUDA)."""
    from fastdiff import sampling

    captured = []

    class FakeLoop:
        def __init__(self, plan, model, shape, dtype, device, *, pool=None, memory_format=None):
            self.batch, self.pool = shape[0], pool
            self.weights = sampling._weights_signature(model)
            captured.append(shape[0])

        def run(self, x, seeds, start, on_step=None):
            self.served = x.shape[0]
            return x.clone()

    pool = object()
    monkeypatch.setattr(sampling, "_CapturedLoop", FakeLoop)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: pool)
    sampler = Sampler(tiny_model(13), DDIMScheduler(num_train_timesteps=100), backend="reference")
    sampler.cuda_graphs = True
    seeds = image_seeds(0, range(64))
    # batch -> the graph batch that serves it: reuse only when the graph is at most 2x the batch, smallest first
    for n, served_by in ((64, 64), (32, 64), (31, 31), (1, 1), (2, 2), (16, 31), (20, 31), (33, 64), (3, 3)):
        sampler.sample(seeds[:n], steps=2)
        loop = [g for g in sampler._graphs.values() if getattr(g, "served", None) == n and g.batch == served_by]
        assert loop, (n, served_by, {k[1][0] for k in sampler._graphs})
        for g in sampler._graphs.values():
            g.served = None
    assert captured == [64, 31, 1, 2, 3]
    assert {g.pool for g in sampler._graphs.values()} == {pool}
    with torch.no_grad():  # in-place edits keep the graphs
        sampler.model.conv_out.bias.add_(0.1)
    sampler.sample(seeds[:64], steps=2)
    assert captured == [64, 31, 1, 2, 3]
    state = {k: v.clone() for k, v in sampler.model.state_dict().items()}
    sampler.model.load_state_dict(state, assign=True)  # new tensors: every cached graph is stale
    sampler.sample(seeds[:64], steps=2)
    assert captured == [64, 31, 1, 2, 3, 64] and sampler.graph_count == 1


def test_seeds_may_be_a_list_of_ints_and_bad_seeds_or_init_images_get_one_line_errors():
    sampler = Sampler(tiny_unet(3), DDIMScheduler(num_train_timesteps=100), backend="reference")
    seeds = image_seeds(4, range(2))
    from_tensor = sampler.sample(seeds, steps=3)
    from_list = sampler.sample(seeds.tolist(), steps=3)
    assert torch.equal(from_list, from_tensor)
    for bad in ([], [1.5, 2.0], torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0.5]), "7"):
        with pytest.raises(ValueError, match="seeds must be"):
            sampler.sample(bad, steps=3)
    grey = torch.zeros(1, 1, 8, 8)  # the model draws 3 channels
    with pytest.raises(ValueError, match="init image has shape .*3 channels of 8x8"):
        sampler.sample(seeds, steps=3, init=grey, strength=0.5)
