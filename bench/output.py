"""Output throughput: images/s end to end with writes, against sampling alone (``fastdiff bench output``).

Modes, each over the same batches (batch 256 by default, per-image seeds, the same sampler):

* ``sampling``          sampler.sample per batch, nothing written: the ceiling.
* ``png_inline``        sample, then encode and write the batch's PNGs on the same thread (what fastdiff did
                        before the background writer: the device waits for the host).
* ``png_background``    sample, hand the batch to ``fastdiff.output.BackgroundWriter`` (uint8 on the device,
                        pinned non-blocking copy on CUDA, PNG encoding and writes on a thread).
* ``npz_background``    the same writer, one npz shard per batch.
* ``generate``          ``fastdiff.sampling.generate`` as the CLI runs it (manifest, model hash, grid included).
* ``writes_alone``      encoding and writing the PNGs of the batches as the writer does (its thread pool), no
                        sampling: the rate the host and disk can sustain.

``png_background / sampling`` is the overlap efficiency (1.0: the writes are free). Several ranks are not
measured here: ranks never communicate while sampling, so N ranks are predicted to give N times the images/s
of one while the disk keeps up; the report says so rather than giving a number.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import common
from .sampling import MODEL_CONFIGS, SCHEDULE

PRESETS = {
    # model, batch, batches per run, DDIM steps, timed repeats per mode
    "quick": {"model": "tiny-16", "batch": 256, "batches": 2, "steps": 2, "repeats": 2},
    "full": {"model": "cifar10-32", "batch": 256, "batches": 8, "steps": 20, "repeats": 3},
}
MODES = ("sampling", "png_inline", "png_background", "npz_background", "generate", "writes_alone")


def build_sampler(name: str, device, dtype, backend: str):
    from fastdiff.sampling import Sampler
    from fastdiff.schedulers import DDIMScheduler
    from fastdiff.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig.from_diffusers_config(MODEL_CONFIGS[name]))
    return Sampler(model, DDIMScheduler.from_config(SCHEDULE), device=device, dtype=dtype, backend=backend)


def _runner(mode: str, sampler, batches: list[list[int]], steps: int, scratch: Path, pictures):
    """A function that runs ``mode`` once into a fresh folder under ``scratch``; returns images written."""
    from fastdiff import output
    from fastdiff.sampling import generate, image_seeds

    shape = sampler.image_shape
    n_images = sum(len(b) for b in batches)

    def fresh(fmt="png"):
        folder = scratch / f"{mode}-{time.monotonic_ns()}"
        folder.mkdir()
        return output.ImageStore(str(folder), shape, fmt, "flat")

    def sampling():
        for indices in batches:
            sampler.sample(image_seeds(0, indices), steps=steps)

    def inline():
        store = fresh()
        for indices in batches:
            out = sampler.sample(image_seeds(0, indices), steps=steps)
            store.write(indices, output.to_uint8_nhwc(out).cpu().numpy())

    def background(fmt):
        def run():
            store = fresh(fmt)
            with output.BackgroundWriter(store) as writer:
                for indices in batches:
                    writer.submit(sampler.sample(image_seeds(0, indices), steps=steps), indices)
        return run

    def whole():
        folder = scratch / f"{mode}-{time.monotonic_ns()}"
        generate(sampler, num_images=n_images, batch_size=len(batches[0]), seed=0, steps=steps, out_dir=str(folder),
                 progress=False)

    def writes_alone():
        store = fresh()
        with ThreadPoolExecutor(output.WRITER_THREADS) as pool:  # as the background writer writes them
            for indices, batch in zip(batches, pictures):
                store.write(indices, batch, executor=pool)

    return {"sampling": sampling, "png_inline": inline, "png_background": background("png"),
            "npz_background": background("npz"), "generate": whole, "writes_alone": writes_alone}[mode]


def measure(runners: dict, device, repeats: int, n_images: int) -> list[dict]:
    """Time every mode ``repeats`` times, the modes interleaved (round after round), so a machine whose load
    drifts during the benchmark slows every mode alike."""
    samples = {mode: [] for mode in runners}
    for round_number in range(repeats):
        for mode, run in runners.items():
            common.sync(device)
            t0 = time.perf_counter()
            run()
            common.sync(device)
            samples[mode].append(time.perf_counter() - t0)
            print(f"  round {round_number + 1}: {mode:<15} {n_images / samples[mode][-1]:10.1f} images/s",
                  file=sys.stderr)
    runs = []
    for mode, times in samples.items():
        median = statistics.median(times)
        runs.append({"mode": mode, "images": n_images, "samples_s": times, "median_s": median,
                     "images_per_second": n_images / median})
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff bench output", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quick", action="store_true", help="the tiny 16x16 model, 2 batches of 256, 2 steps (CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 256)")
    p.add_argument("--batches", type=int, default=None, help="batches per timed run")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per mode (after one warm-up batch)")
    p.add_argument("--dtype", choices=tuple(common.DTYPES), default=None,
                   help="model dtype (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    p.add_argument("--scratch", default=None, help="folder for the images written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="report folder (default bench/results/<device>-<date>/)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 for --quick on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    preset_name = "quick" if args.quick or device.type == "cpu" else "full"
    preset = dict(PRESETS[preset_name])
    for key in ("batch", "batches", "steps", "repeats"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key} must be >= 1, got {value}")
            preset[key] = value
    with common.cpu_threads(common.default_threads(device, preset_name == "quick", args.threads)):
        return _run(args, argv, device, preset_name, preset)


def _run(args, argv, device, preset_name, preset) -> int:
    from fastdiff import output
    from fastdiff.sampling import image_seeds

    dtype = common.DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    sampler = build_sampler(preset["model"], device, dtype, args.backend)
    batch, n_batches, steps = preset["batch"], preset["batches"], preset["steps"]
    batches = [list(range(k * batch, (k + 1) * batch)) for k in range(n_batches)]
    n_images = batch * n_batches
    print(f"bench output: {device}, {preset['model']}, {n_batches} batches of {batch}, DDIM {steps} steps",
          file=sys.stderr)
    sampler.sample(image_seeds(0, batches[0]), steps=steps)  # warm-up: plans, CUDA graph capture, autotuning
    pictures = [output.to_uint8_nhwc(sampler.sample(image_seeds(0, b), steps=steps)).cpu().numpy() for b in batches]
    scratch_root = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="fastdiff-bench-output-"))
    scratch_root.mkdir(parents=True, exist_ok=True)
    try:
        runners = {mode: _runner(mode, sampler, batches, steps, scratch_root, pictures) for mode in MODES}
        runs = measure(runners, device, preset["repeats"], n_images)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch_root, ignore_errors=True)
    by_mode = {r["mode"]: r for r in runs}
    ceiling = by_mode["sampling"]["images_per_second"]
    for r in runs:
        r["fraction_of_sampling_alone"] = common.ratio(r["images_per_second"], ceiling)
    report = {
        "schema": "fastdiff-bench-output/1",
        "provenance": common.provenance(device, argv, "fastdiff bench output " + " ".join(argv)),
        "settings": {"device": device.type, "preset": preset_name, "model": preset["model"],
                     "dtype": common.dtype_name(dtype), "backend": args.backend, "batch": batch,
                     "batches": n_batches, "steps": steps, "repeats": preset["repeats"],
                     "image_shape": list(sampler.image_shape),
                     "scratch": "temporary folder" if not args.scratch else str(args.scratch),
                     "timer": "time.perf_counter around a whole run, device synchronised before and after; "
                              "modes interleaved round by round"},
        "runs": runs,
    }
    common.put(report, "ranks_scaling", None,
               "not measured: one device in this run. Predicted: ranks never communicate while sampling, so N ranks "
               "draw N times the images/s of one as long as the disk keeps up (the writes_alone rate is the disk "
               "and encoder side)")
    out = Path(args.out) if args.out else common.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json_atomic(out / "output.json", report)
    common.write_text_atomic(out / "output.md", markdown(report))
    print(f"wrote {out / 'output.json'} and {out / 'output.md'}", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    label = "CPU" if s["device"] == "cpu" else report["provenance"].get("gpu")
    lines = [f"# fastdiff output benchmark: {label}", "", common.provenance_markdown(report["provenance"]), "",
             f"{s['model']} ({'x'.join(map(str, s['image_shape']))}), {s['dtype']}, {s['batches']} batches of "
             f"{s['batch']}, DDIM {s['steps']} steps; median of {s['repeats']} runs.", ""]
    rows = [[r["mode"], common.fmt(r["images_per_second"], ".1f"), common.fmt(r["median_s"], ".3g"),
             common.fmt(r["fraction_of_sampling_alone"], ".2f")] for r in report["runs"]]
    lines.append(common.markdown_table(["mode", "images/s", "seconds", "vs sampling alone"], rows))
    lines += ["", f"Ranks: {report['ranks_scaling_reason']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
