"""The ``fastdiff`` command: a thin layer over the Python API.

Every user error (bad path, bad config, out-of-range option) ends as one line on stderr and exit
status 2, with no traceback and no partial output file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USAGE = 2


class UsageError(ValueError):
    """A command-line value that is out of range."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fastdiff: error: ...``) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"fastdiff: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def bool_list(text: str) -> tuple[bool, ...]:
    words = {"1": True, "true": True, "t": True, "yes": True, "0": False, "false": False, "f": False, "no": False}
    try:
        return tuple(words[v.strip().lower()] for v in text.split(",") if v.strip())
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected comma-separated booleans (1/0, true/false), got {text!r}") from None


def _resolve_dtype(name: str, device):
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type == "cpu" and dtype != torch.float32:
        raise UsageError(f"--dtype {name} needs a GPU; the CPU path samples in float32")
    return dtype


# ----------------------------------------------------------------------------------------- sample
def _add_sample(sub):
    p = sub.add_parser("sample", help="generate images (default: the embedded digits model)")
    p.add_argument("--model", default=None, help="fastdiff checkpoint or diffusers UNet2DModel directory "
                   "(default: the embedded digits model)")
    p.add_argument("--scheduler", choices=("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"), default="ddim")
    p.add_argument("--solver-order", type=int, choices=(1, 2, 3), default=None,
                   help="DPM-Solver order (default 2)")
    p.add_argument("--karras", action="store_true", help="DPM-Solver: Karras et al. (2022) sigma spacing")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (ddim: 50, dpmsolver++: 15, ddpm: all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--num-images", type=_positive_int, default=64)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0, help="base seed; image i depends only on (seed, i)")
    p.add_argument("--out", default="samples", help="output folder (one PNG per image, plus grid.png)")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run with other "
                   "settings in --out (a rerun with the same settings resumes without it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the sampling loop eagerly on CUDA")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side in pixels (default: the model's sample_size)")
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture")
    p.add_argument("--strength", type=_unit_float, default=0.6, help="image-to-image noise level in [0, 1]")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    if args.model is not None and not os.path.exists(args.model):
        raise UsageError(f"--model: no such file or directory: {args.model}")
    if args.init_image is not None and not os.path.isfile(args.init_image):
        raise UsageError(f"--init-image: no such file: {args.init_image}")
    if args.scheduler == "ddpm" and args.eta:
        raise UsageError("--eta applies to --scheduler ddim only")
    dpm = args.scheduler.endswith("dpmsolver++")
    if dpm and args.eta:
        raise UsageError("--eta applies to --scheduler ddim only (sde-dpmsolver++ is the stochastic DPM-Solver)")
    if not dpm and (args.solver_order is not None or args.karras):
        raise UsageError("--solver-order and --karras apply to --scheduler dpmsolver++ / sde-dpmsolver++ only")
    scheduler_options = {"solver_order": args.solver_order or 2, "use_karras_sigmas": args.karras} if dpm else None

    from . import images
    from .devices import resolve_device
    from .pipeline import build_sampler, default_steps
    from .sampling import generate

    device = resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    sampler, description = build_sampler(args.model, args.scheduler, device=device, dtype=dtype,
                                         backend=args.backend, cuda_graphs=False if args.no_cuda_graphs else None,
                                         scheduler_options=scheduler_options)
    steps = args.steps or default_steps(args.scheduler, sampler)
    if steps > sampler.scheduler.num_train_timesteps:
        raise UsageError(f"--steps {steps} exceeds the model's {sampler.scheduler.num_train_timesteps} training timesteps")
    if args.image_size is not None:
        image_shape = (sampler.model.config.in_channels, args.image_size, args.image_size)
    else:
        image_shape = sampler.image_shape
    init = None
    if args.init_image is not None:
        init = images.load_image(args.init_image, image_shape[0], image_shape[1:])
    print(f"fastdiff: {description}; {args.scheduler} {steps} steps, {args.num_images} images "
          f"on {device} ({args.dtype}, backend {args.backend}) -> {args.out}", file=sys.stderr)
    result = generate(sampler, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed, steps=steps,
                      eta=args.eta, out_dir=args.out, init=init, strength=args.strength, grid=not args.no_grid,
                      progress=not args.no_progress, image_shape=image_shape, overwrite=args.overwrite,
                      model=args.model or description)
    note = f" ({result.skipped} already there)" if result.skipped else ""
    print(f"wrote {len(result.written)} images to {args.out}{note}" + (f"; grid: {result.grid}" if result.grid else ""))
    return 0


# ----------------------------------------------------------------------------------------- shapes
def _add_shapes(sub):
    p = sub.add_parser("shapes", help="print every block's output shape for a UNet configuration (meta device)")
    p.add_argument("--model", default=None, help="read the configuration from this checkpoint instead")
    p.add_argument("--image-size", type=_positive_int, default=32)
    p.add_argument("--image-channels", type=_positive_int, default=3)
    p.add_argument("--n-channels", type=_positive_int, default=64)
    p.add_argument("--ch-mults", type=int_list, default=(1, 2, 2, 4))
    p.add_argument("--is-attn", type=bool_list, default=None, help="per level, e.g. 0,0,1,1 (default: none)")
    p.add_argument("--n-blocks", type=_positive_int, default=2)
    p.add_argument("--norm-groups", type=_positive_int, default=32)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.set_defaults(run=_run_shapes)


def _run_shapes(args) -> int:
    from .shapes import format_shapes, trace_shapes
    from .unet import UNetConfig

    if args.model is not None:
        from .checkpoint import load_config

        config = load_config(args.model)
    else:
        is_attn = args.is_attn if args.is_attn is not None else (False,) * len(args.ch_mults)
        if len(is_attn) != len(args.ch_mults):
            raise UsageError(f"--is-attn has {len(is_attn)} entries for {len(args.ch_mults)} levels of --ch-mults")
        config = UNetConfig.classic(n_channels=args.n_channels, ch_mults=args.ch_mults, is_attn=is_attn,
                                    n_blocks=args.n_blocks, image_channels=args.image_channels,
                                    image_size=args.image_size, norm_num_groups=args.norm_groups)
    print(format_shapes(trace_shapes(config, batch_size=args.batch_size), config))
    return 0


# ----------------------------------------------------------------------------------------- info
def _add_info(sub):
    p = sub.add_parser("info", help="versions, devices and available accelerated backends")
    p.set_defaults(run=lambda args: _print_info())


def _print_info() -> int:
    from .info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


# ----------------------------------------------------------------------------------------- kernels
def _add_kernels(sub):
    p = sub.add_parser("kernels", help="compile every Triton kernel variant for GPU targets (no GPU needed) "
                       "and report registers, spills and shared memory")
    p.add_argument("--target", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.set_defaults(run=_run_kernels)


def _run_kernels(args) -> int:
    from fastdiff.kernels.compile_check import main as compile_main

    argv = ["--target", args.target] + (["--json", args.json] if args.json else [])
    return compile_main(argv)


# ----------------------------------------------------------------------------------------- delegated
def _add_delegated(sub, name: str, module: str, help_text: str):
    p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args):
        import importlib

        return importlib.import_module(module).main(args.rest) or 0

    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdiff", description="Triton-accelerated diffusion sampling")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (backend choices, fallbacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_sample(sub)
    _add_shapes(sub)
    _add_info(sub)
    _add_kernels(sub)
    _add_delegated(sub, "train", "fastdiff.train", "train a UNet on digits or a folder of images")
    _add_delegated(sub, "eval", "fastdiff.evaluate", "sample-quality metrics for digit models")
    _add_delegated(sub, "bench", "fastdiff.bench_cli", "benchmarks: `bench kernels` and `bench sampling`")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["sample", *(argv or [])])
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `fastdiff shapes | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fastdiff: interrupted; images written so far are kept and a rerun resumes", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if args.verbose:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastdiff: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
