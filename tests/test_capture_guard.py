"""The sampling step never reads device data on the host, for every scheduler and every option.

A ``TorchDispatchMode`` (``fastdiff.profiling.record_ops``) records every aten op of each step run through the
real ``SamplingPlan.step`` and fails on a host read (``_local_scalar_dense``, ``is_nonzero``, ``nonzero``,
``equal``, ``item``, data-sized outputs, device-to-host copies): each is a synchronisation, and an error inside
CUDA-graph capture. The C++ paths are seen too (indexing with a 0-dim device tensor), which patching Python's
``Tensor.item`` misses. Cases come from ``fastdiff.schedulers.SCHEDULERS`` and each scheduler's config fields,
so a scheduler added to the registry is covered without editing this file.

Runs on the GPU when there is one, else on the CPU with Triton under its interpreter (tests/kernel_device.py).
"""

from __future__ import annotations

import dataclasses
import inspect

from kernel_device import DEVICE  # first: settles TRITON_INTERPRET before any kernel module is imported

import pytest
import torch

from fastdiff import sampling
from fastdiff.profiling import HOST_READ_OPS, host_reads, launches, record_ops
from fastdiff.sampling import CaptureError, Sampler, SamplingPlan, capture_graph, image_seeds, make_loop_state
from fastdiff.schedulers import SCHEDULERS
from fastdiff.schedulers.ddpm import VARIANCE_TYPES
from fastdiff.schedulers.schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS
from fastdiff.testing import assert_close
from fastdiff.unet import UNet, UNetConfig

STEPS = 4
TRAIN_STEPS = 100
# Values to cover for config fields a scheduler may have (fields it lacks are ignored); a bool field not listed
# here is tried both ways. Names follow diffusers, so a scheduler ported from it (DPM-Solver++) is covered too.
OPTION_VALUES = {
    "prediction_type": PREDICTION_TYPES,
    "variance_type": VARIANCE_TYPES,
    "timestep_spacing": TIMESTEP_SPACINGS,
    "clip_sample": (True, False),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"),
    "solver_order": (1, 2, 3),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": ("zero", "sigma_min"),
}
NOT_OPTIONS = {"thresholding"}  # refused by fastdiff's schedulers (a ValueError, tested elsewhere)
ETAS = (0.0, 0.5)


def _config_fields(cls) -> dict:
    """{field: default} of a scheduler's configuration (its config dataclass, else its constructor)."""
    config_class = getattr(cls, "config_class", None)
    if config_class is not None and dataclasses.is_dataclass(config_class):
        return {f.name: f.default for f in dataclasses.fields(config_class)}
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _builds(cls, options: dict, eta: float):
    """Whether this (options, eta) is a valid setting of ``cls`` (invalid ones raise ValueError by contract):
    False, True, or the reason it cannot run here (an optional package it needs is missing)."""
    try:
        cls(num_train_timesteps=TRAIN_STEPS, **options).set_timesteps(STEPS, eta=eta)
    except ValueError:
        return False
    except ImportError as exc:
        return str(exc)
    return True


def _cases():
    cases = []
    for name, cls in sorted(SCHEDULERS.items()):
        variants = [{}]
        for field, default in _config_fields(cls).items():
            if field in NOT_OPTIONS:
                continue
            values = OPTION_VALUES.get(field, (True, False) if isinstance(default, bool) else ())
            variants += [{field: v} for v in values if v != default]
        for options in variants:
            for eta in ETAS:
                builds = _builds(cls, options, eta)
                if builds:
                    label = ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"
                    marks = () if builds is True else (pytest.mark.skip(reason=builds),)
                    cases.append(pytest.param(cls, options, eta, id=f"{name}-{label}-eta{eta}", marks=marks))
    return cases


CASES = _cases()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = UNetConfig.classic(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                                image_channels=1, image_size=8, norm_num_groups=4)
    return UNet(config).eval()


def test_every_registered_scheduler_has_cases():
    covered = {param.values[0] for param in CASES}
    assert covered == set(SCHEDULERS.values())
    assert len(CASES) >= 2 * len(SCHEDULERS)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cls,options,eta", CASES)
def test_no_step_reads_the_device_on_the_host(cls, options, eta, backend):
    """Every step of the real SamplingPlan.step, no host read. The UNet's ops do not depend on the scheduler, so
    under the (slow) interpreter the UNet runs its Triton kernels in one case (the first scheduler's defaults) and
    the reference elsewhere, while the update step runs on ``backend`` in every case."""
    model = tiny_model()
    sampler = Sampler(model, cls(num_train_timesteps=TRAIN_STEPS, **options), device=DEVICE, backend=backend,
                      cuda_graphs=False)
    if backend == "triton" and DEVICE == "cpu" and (options or eta or cls is not SCHEDULERS[min(SCHEDULERS)]):
        sampler.model.set_backend("reference")
    plan = sampler.plan(STEPS, eta)
    state = make_loop_state((2, 1, 8, 8), torch.float32, sampler.device)
    state.seeds.copy_(image_seeds(0, range(2)))
    with torch.no_grad():
        plan.step(sampler.model, state)  # warm-up outside the guard (lazy initialisation may sync once)
        state.step_index.zero_()
        for i in range(plan.steps):  # every step: a multistep solver's first and last steps differ
            _, ops = record_ops(plan.step, sampler.model, state)
            assert launches(ops) > 10, "the recorder saw no work: the guard would pass vacuously"
            reads = host_reads(ops)
            assert not reads, f"step {i} reads the device on the host: {reads}"
    assert torch.isfinite(state.x).all()
    assert state.step_index.cpu().tolist() == plan.steps


# ------------------------------------------------------------------------------------------- the guard itself
def _old_step(self, model, state):
    """The step before the fix: the timestep read with a 0-dim index (a host read in C++)."""
    t = self.timesteps[state.step_index]
    state.x.copy_(self.scheduler.step_at(model(state.x, t), state.step_index, state.x,
                                         seeds=state.seeds if self.scheduler.needs_noise else None))
    state.step_index.add_(1)


def test_the_guard_catches_the_cpp_host_read_of_zero_dim_indexing(monkeypatch):
    model = tiny_model()
    sampler = Sampler(model, SCHEDULERS["ddim"](num_train_timesteps=TRAIN_STEPS), device=DEVICE,
                      backend="reference", cuda_graphs=False)
    plan = sampler.plan(STEPS, 0.0)
    state = make_loop_state((1, 1, 8, 8), torch.float32, sampler.device)
    monkeypatch.setattr(SamplingPlan, "step", _old_step)
    with torch.no_grad():
        _, ops = record_ops(plan.step, sampler.model, state)
    assert host_reads(ops) == ["aten._local_scalar_dense"]


@pytest.mark.parametrize("what,fn", [
    ("bool of a tensor", lambda t: bool(t.sum() > 0)),
    ("int of a tensor", lambda t: int(t.argmax())),
    (".item()", lambda t: t.sum().item()),
    ("0-dim tensor index", lambda t: t[torch.tensor(1, device=t.device)]),
    ("torch.equal", lambda t: torch.equal(t, t)),
    ("nonzero", lambda t: t.nonzero()),
    ("boolean mask", lambda t: t[t > 0]),
    ("masked_select", lambda t: t.masked_select(t > 0)),
    ("unique", lambda t: t.unique()),
    ("repeat_interleave by a tensor", lambda t: t.repeat_interleave(torch.ones_like(t, dtype=torch.int64))),
    # A CPU tensor's .tolist() / .numpy() read host memory without any aten op; on a GPU they are copies to the host:
    *([(".tolist()", lambda t: t[:2].tolist()), (".cpu()", lambda t: t.cpu()),
       ("copy to a CPU tensor", lambda t: torch.empty(8).copy_(t))] if DEVICE == "cuda" else []),
])
def test_the_guard_catches_every_host_read(what, fn):
    t = torch.randn(8, device=DEVICE)
    _, ops = record_ops(fn, t)
    assert host_reads(ops), f"{what} was not recognised as a host read: {[op.name for op in ops]}"


def test_the_guard_passes_device_side_equivalents():
    t = torch.randn(8, device=DEVICE)
    index = torch.tensor(3, device=DEVICE)
    _, ops = record_ops(lambda: (t.index_select(0, index.reshape(1)), torch.where(t > 0, t, 0.0), t.clamp(0)))
    assert not host_reads(ops) and launches(ops) >= 3
    assert {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "equal"} <= HOST_READ_OPS


# ------------------------------------------------------------------------------------------- failed capture
class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: records the calls; capture_end fails like an invalidated capture."""

    def __init__(self, end_fails: bool):
        self.calls = []
        self.end_fails = end_fails

    def capture_begin(self, *pool):
        self.calls.append(("begin", pool))

    def capture_end(self):
        self.calls.append(("end",))
        if self.end_fails:
            raise RuntimeError("operation failed due to a previous error during capture")


class _FakeStream:
    def __init__(self):
        self.entered = self.exited = 0

    def __call__(self, stream):
        return self

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *exc):
        self.exited += 1


@pytest.mark.parametrize("end_fails", [True, False])
def test_a_failed_capture_ends_capture_and_leaves_the_stream(end_fails):
    graph, stream = _FakeGraph(end_fails), _FakeStream()

    def failing_step():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(CaptureError, match="not permitted when stream is capturing") as err:
        capture_graph(graph, failing_step, stream=object(), pool=("pool",), stream_context=stream)
    assert "cuda_graphs=False" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)  # the body's error, not capture_end's
    assert graph.calls == [("begin", (("pool",),)), ("end",)]
    assert stream.entered == stream.exited == 1


def test_an_interrupt_during_capture_still_ends_it_and_is_not_wrapped():
    graph, stream = _FakeGraph(True), _FakeStream()

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture_graph(graph, interrupted, stream=object(), stream_context=stream)
    assert graph.calls == [("begin", ()), ("end",)] and stream.entered == stream.exited == 1


def test_a_capture_that_fails_at_its_end_leaves_the_stream():
    graph, stream = _FakeGraph(True), _FakeStream()
    with pytest.raises(CaptureError, match="ending the CUDA-graph capture"):
        capture_graph(graph, lambda: None, stream=object(), stream_context=stream)
    assert graph.calls == [("begin", ()), ("end",)] and stream.entered == stream.exited == 1


def test_a_successful_capture_runs_the_body_once_between_begin_and_end():
    graph, stream, ran = _FakeGraph(False), _FakeStream(), []
    capture_graph(graph, lambda: ran.append(graph.calls[:]), stream=object(), stream_context=stream)
    assert ran == [[("begin", ())]] and graph.calls == [("begin", ()), ("end",)]
    assert stream.entered == stream.exited == 1


@pytest.mark.gpu
def test_after_a_failed_capture_the_process_is_back_on_its_stream(monkeypatch, no_tf32):
    """A step that reads the device during capture fails with CaptureError; the next eager run and the next
    capture work, on the caller's stream, with no capture left open."""
    model = tiny_model()
    sampler = Sampler(model, SCHEDULERS["ddim"](num_train_timesteps=TRAIN_STEPS), device="cuda",
                      backend="reference", cuda_graphs=True)
    seeds = image_seeds(0, range(2))
    before = torch.cuda.current_stream()
    with monkeypatch.context() as m:
        m.setattr(SamplingPlan, "step", _old_step)
        with pytest.raises(CaptureError):
            sampler.sample(seeds, steps=STEPS)
    assert torch.cuda.current_stream() == before
    assert not torch.cuda.is_current_stream_capturing()
    assert sampler.graph_count == 0
    eager = Sampler(model, SCHEDULERS["ddim"](num_train_timesteps=TRAIN_STEPS), device="cuda",
                    backend="reference", cuda_graphs=False).sample(seeds, steps=STEPS)
    graphed = sampler.sample(seeds, steps=STEPS)
    assert sampler.graph_count == 1
    assert_close(graphed, eager, torch.float32, rtol=1e-4, what="graph replay after a failed capture vs eager")
    assert sampling.GRAPH_REUSE_MAX_FACTOR == 2


@pytest.mark.parametrize("run_triton", [True, False])
def test_a_triton_launch_counts_once_and_its_interpreter_copies_not_at_all(run_triton):
    from fastdiff import ops

    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    out, recorded = record_ops(ops.group_norm, x, 4, w, b, 1e-5, silu=True, backend="triton", run_triton=run_triton)
    names = [op.name for op in recorded if op.launches_work]
    assert [n for n in names if n.startswith("triton.")] == ["triton._gn_single_kernel"], names
    assert not host_reads(recorded) and launches(recorded) == len(names) <= 2, names  # the kernel (+ nothing else)
    if run_triton:
        torch.testing.assert_close(out, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b, 1e-5)),
                                   rtol=1e-5, atol=1e-5)
