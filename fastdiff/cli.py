"""The ``fastdiff`` command: a thin layer over the Python API.

Every user error (bad path, bad config, out-of-range option, an unusable output folder, a full disk) ends
as one line on stderr and exit status 2, with no traceback (``fastdiff --traceback ...`` shows it) and no
partial output file. ``train``, ``eval`` and ``kernels`` use the same parser (``_Parser``): one-line
errors, every default in ``--help``, option values that start with a dash read as values.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USAGE = 2


class RankFailedError(RuntimeError):
    """Another process of a torchrun launch failed (see fastdiff.distributed)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(ValueError):
    """A command-line value that is out of range."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` states every option's default, except where the help text already does or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fastdiff: error: ...``) instead of the usage block, defaults in ``--help``,
    and option values that start with a dash (``--ch-mults -1,2``, ``--seed -1``) read as values, not flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"fastdiff: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self._join_dash_values(sys.argv[1:] if args is None else list(args)),
                                         namespace)

    def _join_dash_values(self, args: list[str]) -> list[str]:
        """``["--opt", "-1,2"]`` -> ``["--opt=-1,2"]`` for options that take one value."""
        out, i = [], 0
        while i < len(args):
            action = self._option_string_actions.get(args[i])
            if (action is not None and action.nargs is None and action.option_strings and i + 1 < len(args)
                    and args[i + 1].startswith("-") and args[i + 1] not in self._option_string_actions
                    and not isinstance(action, (argparse._StoreConstAction, argparse._HelpAction,
                                                argparse._VersionAction))):
                out.append(f"{args[i]}={args[i + 1]}")
                i += 2
                continue
            if args[i] == "--":
                out += args[i:]
                break
            out.append(args[i])
            i += 1
        return out


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


def positive_int_list(text: str) -> tuple[int, ...]:
    """``1,2,2`` -> (1, 2, 2): at least one value, every one positive (channel multipliers)."""
    values = int_list(text)
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def seed_int(text: str) -> int:
    """A base seed in [0, 2**64) (``fastdiff.sampling.check_seed``): larger ones would repeat a smaller seed's images."""
    from .sampling import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return check_seed(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    p.add_argument("--scheduler", choices=("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"), default="ddim",
                   help="sampler")
    p.add_argument("--solver-order", type=int, choices=(1, 2, 3), default=None,
                   help="DPM-Solver order (default 2)")
    p.add_argument("--karras", action="store_true", help="DPM-Solver: Karras et al. (2022) sigma spacing")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (ddim: 50, dpmsolver++: 15, ddpm: all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--num-images", type=_positive_int, default=64, help="images to draw")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (never changes an image)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="base seed in [0, 2**64); image i depends only on (seed, i)")
    p.add_argument("--out", default="samples", help="output folder (one PNG per image, grid.png and the run "
                   "manifest run.json; a rerun with the same settings resumes)")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run with other "
                   "settings in --out (a rerun with the same settings resumes without it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="sampling precision (half precision needs a GPU)")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="auto: Triton kernels on CUDA tensors, the reference ops elsewhere")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the sampling loop eagerly on CUDA")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side in pixels (default: the model's sample_size)")
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture")
    p.add_argument("--strength", type=_unit_float, default=None,
                   help="image-to-image noise level in [0, 1] (default: 0.6; only with --init-image)")
    p.add_argument("--format", choices=("png", "npz"), default="png", help="one PNG per image, or npz shards of "
                   "uint8 [N, H, W, C] (one per batch, as FID tools read them)")
    p.add_argument("--layout", choices=("auto", "flat", "subfolders"), default="auto", help="PNGs in --out, or in "
                   "subfolders of 1,000 (auto: subfolders above 10,000 images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength applies to image-to-image only; give --init-image too")
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

    from . import distributed

    ranks = distributed.from_environment()  # one process, or this rank of a torchrun launch
    try:
        code = _sample_on(ranks, args, scheduler_options)
    except BaseException:
        ranks.close(meet=False)
        raise
    ranks.close()
    return code


def _sample_on(ranks, args, scheduler_options) -> int:
    from . import images
    from .fileio import prepare_output_dir
    from .pipeline import build_sampler, default_steps
    from .sampling import generate

    with ranks.stage("choosing the device"):  # every rank checks its GPU before anything is written
        device = ranks.device_for(args.device)
        dtype = _resolve_dtype(args.dtype, device)
    with ranks.stage("checking the output folder"):  # before loading or sampling anything
        prepare_output_dir(args.out, "--out")
    with ranks.stage("loading the model"):
        sampler, description = build_sampler(args.model, args.scheduler, device=device, dtype=dtype,
                                             backend=args.backend, cuda_graphs=False if args.no_cuda_graphs else None,
                                             scheduler_options=scheduler_options)
        steps = args.steps or default_steps(args.scheduler, sampler)
        if steps > sampler.scheduler.num_train_timesteps:
            raise UsageError(f"--steps {steps} exceeds the model's {sampler.scheduler.num_train_timesteps} "
                             "training timesteps")
        if args.image_size is not None:
            image_shape = (sampler.model.config.in_channels, args.image_size, args.image_size)
        else:
            image_shape = sampler.image_shape
        init = None
        strength = 0.6 if args.strength is None else args.strength
        if args.init_image is not None:
            init = images.load_image(args.init_image, image_shape[0], image_shape[1:], warn=ranks.is_main)
    if ranks.is_main:
        _warn_if_large(sampler, image_shape, steps, args.num_images, device)
    where = f"on {device}" if not ranks.distributed else f"on {ranks.world_size} processes ({device.type})"
    if ranks.is_main:
        print(f"fastdiff: {description}; {args.scheduler} {steps} steps, {args.num_images} images "
              f"{where} ({args.dtype}, backend {args.backend}) -> {args.out}", file=sys.stderr)
    result = generate(sampler, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed, steps=steps,
                      eta=args.eta, out_dir=args.out, init=init, strength=strength, grid=not args.no_grid,
                      progress=not args.no_progress, image_shape=image_shape, overwrite=args.overwrite,
                      model_source=args.model or description, output_format=args.format, layout=args.layout,
                      ranks=ranks)
    if ranks.is_main:
        drawn = sum(r["images"] for r in result.per_rank)
        skipped = sum(r["skipped"] for r in result.per_rank)
        note = f" ({skipped} already there)" if skipped else ""
        if result.regenerated:
            note += f" ({len(result.regenerated)} unreadable images drawn again)"
        print(f"wrote {drawn} images to {args.out}{note}" + (f"; grid: {result.grid}" if result.grid else ""))
    return 0


LARGE_RUN_FLOP = 1e15  # about an hour of a CPU's float32 rate, a few seconds of a big GPU's


def _warn_if_large(sampler, image_shape, steps: int, num_images: int, device) -> None:
    """A warning with the compute estimate when --image-size is far above the model's training size."""
    trained = sampler.model.config.sample_size
    trained_hw = (trained, trained) if isinstance(trained, int) else tuple(trained or image_shape[1:])
    ratio = image_shape[1] * image_shape[2] / (trained_hw[0] * trained_hw[1])
    if ratio <= 4:
        return
    from .shapes import flops_per_image

    flop = float(flops_per_image(sampler.model.config, image_size=tuple(image_shape[1:])))
    total = flop * steps * num_images
    if ratio > 16 or total > LARGE_RUN_FLOP:
        print(f"fastdiff: warning: {image_shape[1]}x{image_shape[2]} is {ratio:.0f} times the pixels of the "
              f"model's {trained_hw[0]}x{trained_hw[1]} training size: {flop / 1e9:.3g} GFLOP per image and step, "
              f"{total / 1e12:.3g} TFLOP for {num_images} images x {steps} steps on {device}; "
              "a model rarely draws well far above its training size", file=sys.stderr)


# ----------------------------------------------------------------------------------------- shapes
_SHAPES_ARCHITECTURE = {"image_channels": 3, "n_channels": 64, "ch_mults": (1, 2, 2, 4), "is_attn": None,
                        "n_blocks": 2, "norm_groups": 32}


def _add_shapes(sub):
    p = sub.add_parser("shapes", help="print every block's output shape for a UNet configuration (meta device)")
    p.add_argument("--model", default=None, help="read the configuration from this checkpoint instead of the "
                   "options below (--image-size and --batch-size still apply)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side (default: the model's sample_size, or 32)")
    p.add_argument("--image-channels", type=_positive_int, default=None, help="default: 3")
    p.add_argument("--n-channels", type=_positive_int, default=None, help="default: 64")
    p.add_argument("--ch-mults", type=positive_int_list, default=None, help="default: 1,2,2,4")
    p.add_argument("--is-attn", type=bool_list, default=None, help="per level, e.g. 0,0,1,1 (default: none)")
    p.add_argument("--n-blocks", type=_positive_int, default=None, help="default: 2")
    p.add_argument("--norm-groups", type=_positive_int, default=None, help="default: 32")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="batch dimension of the traced input")
    p.set_defaults(run=_run_shapes)


def _run_shapes(args) -> int:
    from .shapes import format_shapes, trace_shapes
    from .unet import UNetConfig

    if args.model is not None:
        from .checkpoint import load_config

        given = [f"--{k.replace('_', '-')}" for k in _SHAPES_ARCHITECTURE if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} cannot be combined with --model "
                             "(the checkpoint fixes the architecture)")
        config = load_config(args.model)
        image_size = args.image_size
    else:
        arch = {k: default if getattr(args, k) is None else getattr(args, k)
                for k, default in _SHAPES_ARCHITECTURE.items()}
        is_attn = arch["is_attn"] if arch["is_attn"] is not None else (False,) * len(arch["ch_mults"])
        if len(is_attn) != len(arch["ch_mults"]):
            raise UsageError(f"--is-attn has {len(is_attn)} entries for {len(arch['ch_mults'])} levels of --ch-mults")
        image_size = args.image_size or 32
        config = UNetConfig.classic(n_channels=arch["n_channels"], ch_mults=arch["ch_mults"], is_attn=is_attn,
                                    n_blocks=arch["n_blocks"], image_channels=arch["image_channels"],
                                    image_size=image_size, norm_num_groups=arch["norm_groups"])
    print(format_shapes(trace_shapes(config, batch_size=args.batch_size, image_size=image_size), config))
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
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if not targets:
        raise UsageError(f"--target {args.target!r} names no target; give e.g. sm_80,sm_90")
    if args.json is not None:
        check_output_file(args.json, "--json")
    from fastdiff.kernels.compile_check import main as compile_main

    argv = ["--target", ",".join(targets)] + (["--json", args.json] if args.json else [])
    return compile_main(argv)


def check_output_file(path: str, what: str) -> str:
    """Before any work: ``path`` can be written as a file (not empty, not a folder, its folder exists)."""
    if not path.strip():
        raise UsageError(f"{what} is empty; give a file name")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{what} {path}: the folder {folder} is not writable")
    return path


# ----------------------------------------------------------------------------------------- delegated
def _add_delegated(sub, name: str, module: str, help_text: str):
    p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args):
        import importlib

        return importlib.import_module(module).main(args.rest) or 0

    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="fastdiff", description="Triton-accelerated diffusion sampling")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging of fastdiff (backend choices, fallbacks); other libraries stay quiet")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_sample(sub)
    _add_shapes(sub)
    _add_info(sub)
    _add_kernels(sub)
    _add_delegated(sub, "train", "fastdiff.train", "train a UNet on digits or a folder of images")
    _add_delegated(sub, "eval", "fastdiff.evaluate", "sample-quality metrics for digit models")
    _add_delegated(sub, "bench", "fastdiff.bench_cli", "benchmarks: `bench kernels` and `bench sampling`")
    return parser


def _setup_logging(verbose: bool) -> None:
    """Warnings from everyone on stderr; with -v, debug messages from fastdiff's own loggers only."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("fastdiff").setLevel(logging.DEBUG if verbose else logging.NOTSET)


def one_line(exc: BaseException) -> str:
    """The first line of an error's message; an OSError as 'what: why' (its file named)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `fastdiff shapes | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fastdiff: interrupted; images written so far are kept and a rerun resumes", file=sys.stderr)
        return 130
    except RankFailedError as exc:  # another process of a torchrun launch failed: its error, its exit status
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (UsageError, ValueError, OSError) as exc:
        if args.traceback:
            raise
        print(f"fastdiff: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
