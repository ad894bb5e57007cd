"""What a piece of code asks of the device, counted on any device (the CPU included) with a dispatch mode.

``record_ops(fn)`` runs ``fn`` under a ``torch.utils._python_dispatch.TorchDispatchMode`` that records every
aten op PyTorch dispatches (the C++ paths included: indexing with a 0-dim tensor shows up as
``aten._local_scalar_dense``, which patching Python's ``Tensor.item`` never sees) and every Triton kernel
launch (recorded as ``triton.<kernel name>``; the kernel itself runs with the mode suspended, so the Triton
interpreter's own host copies are not mistaken for the caller's).

From the record:

* ``host_reads(ops)``: the ops that read device data on the host (a synchronisation, and an error inside
  CUDA-graph capture): ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``, indexing with a 0-dim
  tensor), ``is_nonzero``, ``nonzero``, ``equal``, ops whose output size depends on the data (``masked_select``,
  ``unique``, ``bincount``, ``repeat_interleave`` with a tensor of repeats, indexing with a boolean mask), and
  copies from a non-CPU device to the CPU. (``.tolist()`` and ``.numpy()`` of a CPU tensor read host memory
  without any aten op, so they are seen on a GPU, as copies to the host, and not on the CPU.)
* ``launches(ops)``: the ops that launch device work: every recorded op except views (``view``, ``expand``,
  ``select``, ``transpose`` ...), allocations without initialisation (``empty*``) and metadata-only ops. One
  aten op is counted as one launch and one Triton kernel as one; a backend may split an op into more kernels
  (cuDNN's convolution plus its bias add, for example), so on CUDA the figure is a lower bound.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Ops that read device data on the host (by aten overload packet name, without the "aten." prefix).
HOST_READ_OPS = frozenset({
    "_local_scalar_dense",  # the C++ .item(): int(t), float(t), bool(t), t.tolist(), table[zero_dim_tensor]
    "item",
    "is_nonzero",  # bool(t)
    "nonzero",  # output size = number of non-zeros
    "argwhere",
    "equal",  # torch.equal returns a Python bool
    "allclose",
    "masked_select",  # output size depends on the mask
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "histc",
})
_DATA_SIZED_OVERLOADS = {"repeat_interleave": ("Tensor", "self_Tensor")}  # repeats as a tensor: sized by its sum
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # host read with a boolean index
_COPY_OPS = frozenset({"_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"})
# Ops that allocate without writing or only touch metadata: no device work.
NO_WORK_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "detach", "detach_", "lift_fresh", "alias", "_unsafe_view", "set_", "resize_", "resize_as_",
    "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "dim", "size", "stride", "is_contiguous", "_reshape_alias", "as_strided_",
    "record_stream", "_nested_tensor_size",
})


@dataclasses.dataclass(frozen=True)
class Op:
    """One recorded call: ``name`` ("aten.addmm", "triton._group_norm_kernel"), whether it is a view,
    and whether it reads device data on the host."""

    name: str
    is_view: bool = False
    host_read: bool = False

    @property
    def short(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def launches_work(self) -> bool:
        return not self.is_view and self.short not in NO_WORK_OPS


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _tensors(a)
    return out


def _reads_host(name: str, overload: str, args, kwargs) -> bool:
    """Whether aten op ``name.overload`` called with these arguments reads device data on the host."""
    if name in HOST_READ_OPS:
        return True
    if overload in _DATA_SIZED_OVERLOADS.get(name, ()):
        return kwargs.get("output_size") is None
    if name in _INDEX_OPS and len(args) > 1:
        return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2]))
    if name in _COPY_OPS:
        tensors = _tensors(list(args) + list(kwargs.values()))
        to_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if name == "copy_" and len(args) >= 2:
            return args[0].device.type == "cpu" and args[1].device.type not in ("cpu", "meta")
        return to_cpu and any(t.device.type not in ("cpu", "meta") for t in tensors)
    return False


class OpRecorder(TorchDispatchMode):
    """Records every aten op (and, through ``record_ops``, every Triton launch) while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket.__name__
        self.ops.append(Op(f"{func.namespace}.{packet}", bool(getattr(func, "is_view", False)),
                           _reads_host(packet, func._overloadname, args, kwargs)))
        return func(*args, **kwargs)


def _triton_launchers():
    """The classes whose ``run`` launches a Triton kernel (compiled and interpreted), if Triton imports."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except Exception:  # no Triton, or a version without the interpreter: nothing to patch
        pass
    return classes


@contextlib.contextmanager
def _count_triton_launches(recorder: OpRecorder, run_triton: bool = True):
    originals = {cls: cls.run for cls in _triton_launchers()}

    def wrap(run):
        def counted_run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")
                recorder.ops.append(Op(f"triton.{name}"))
                if not run_triton:
                    return None
            with _disable_current_modes():  # the interpreter's own host copies are not the caller's
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return counted_run

    try:
        for cls, run in originals.items():
            cls.run = wrap(run)
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def record_ops(fn, *args, run_triton: bool = True, **kwargs) -> tuple[object, list[Op]]:
    """(fn(*args, **kwargs), the ops it ran), recorded on whatever device the tensors live on.

    ``run_triton=False`` records Triton launches without running them (their outputs stay unwritten): for
    counting only, e.g. a large model under the slow Triton interpreter, since a capturable step's sequence
    of launches cannot depend on the data.
    """
    recorder = OpRecorder()
    with _count_triton_launches(recorder, run_triton), recorder:
        result = fn(*args, **kwargs)
    return result, recorder.ops


def host_reads(ops: list[Op]) -> list[str]:
    """Names of the recorded ops that read device data on the host, in order."""
    return [op.name for op in ops if op.host_read]


def launches(ops: list[Op]) -> int:
    """Number of recorded ops that launch device work (see the module docstring)."""
    return sum(op.launches_work for op in ops)


def launch_histogram(ops: list[Op]) -> dict[str, int]:
    """{op name: launches}, most frequent first."""
    return dict(collections.Counter(op.name for op in ops if op.launches_work).most_common())


def sampling_step_launches(model, scheduler, *, batch_size: int = 1, steps: int = 10, eta: float = 0.0,
                           backend: str = "reference", device="cpu", dtype=torch.float32,
                           run_triton: bool = True) -> dict:
    """Launches and host reads of one ``SamplingPlan.step`` (UNet forward + update) of ``model``.

    Counted on ``device`` after a warm-up step (lazy initialisation is not a per-step cost); the count does
    not depend on the weights or the data. ``backend="triton"`` on the CPU needs ``TRITON_INTERPRET=1``;
    ``run_triton=False`` then counts without interpreting the kernels (see ``record_ops``).
    Returns {"launches": int, "host_reads": [names], "by_op": {name: count}}.
    """
    from .sampling import Sampler, make_loop_state

    sampler = Sampler(model, scheduler, device=device, dtype=dtype, backend=backend, cuda_graphs=False)
    plan = sampler.plan(steps, eta)
    state = make_loop_state((batch_size, *sampler.image_shape), dtype, sampler.device, sampler.memory_format)
    with torch.no_grad():
        record_ops(plan.step, sampler.model, state, run_triton=run_triton)  # warm-up
        state.step_index.zero_()
        _, ops = record_ops(plan.step, sampler.model, state, run_triton=run_triton)
    return {"launches": launches(ops), "host_reads": host_reads(ops), "by_op": launch_histogram(ops)}


def main(argv=None) -> int:
    """``python -m fastdiff.profiling``: launches and host reads of one sampling step of a UNet configuration."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(prog="python -m fastdiff.profiling", description=main.__doc__)
    parser.add_argument("--backend", choices=("reference", "triton", "auto"), default="reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--config", default=None, help="UNetConfig JSON file (default: the DDPM CIFAR-10 UNet)")
    parser.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--by-op", action="store_true", help="also print the launches of each op")
    args = parser.parse_args(argv)
    if args.backend == "triton" and torch.device(args.device).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are first imported
    from .schedulers import SCHEDULERS
    from .unet import UNet, UNetConfig

    config = UNetConfig()
    if args.config:
        with open(args.config) as f:
            config = UNetConfig.from_dict(json.load(f))
    with torch.device("cpu"):
        model = UNet(config).eval()
    # On the CPU the Triton kernels are recorded, not interpreted: the count does not depend on the data.
    counted = sampling_step_launches(model, SCHEDULERS[args.scheduler](), batch_size=args.batch_size,
                                     backend=args.backend, device=args.device,
                                     run_triton=torch.device(args.device).type != "cpu")
    print(f"launches per step: {counted['launches']} ({args.backend}, {args.device}, batch {args.batch_size}); "
          f"host reads: {len(counted['host_reads'])} {counted['host_reads']}")
    if args.by_op:
        for name, n in counted["by_op"].items():
            print(f"  {n:4d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
