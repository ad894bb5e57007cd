"""Experiment: few-step sampling with DPM-Solver++ (Lu et al., 2022) against DDIM on the embedded digits model.

Samples the same seeds with DDIM (eta 0, the model's x0 clipping) and with multistep DPM-Solver++ of order 2 and 3
(and order 2 on Karras sigmas) at 5, 10, 15, 20 and 50 steps, and scores each set with ``fastdiff.evaluate``
(Frechet distance and kernel distance to the held-out digits in the digit classifier's feature space, confident
share). Question: does DPM-Solver++ at 10-15 steps reach DDIM-50's quality, within the noise of real-vs-real sets?

Writes ``docs/experiment_dpm.{md,json,png}`` (``docs/dpm_solver.md`` discusses it). Each row is saved as soon as it
is done; ``--resume`` keeps the rows already in the JSON (same model, image count and seed).

    python bench/experiment_dpm.py                                  # 256 images per row
    python bench/experiment_dpm.py --num-images 32 --steps 5,10 --out /tmp/x      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.experiment_steps import model_digest, real_spread  # noqa: E402
from fastdiff.evaluate import evaluate_images, real_features, sample_images  # noqa: E402
from fastdiff.pipeline import build_sampler, default_model_dir  # noqa: E402

NAME = "experiment_dpm"
FAMILIES = {  # label -> (scheduler, DPM-Solver options)
    "DDIM": ("ddim", None),
    "DPM-Solver++ 2M": ("dpmsolver++", {"solver_order": 2}),
    "DPM-Solver++ 3M": ("dpmsolver++", {"solver_order": 3}),
    "DPM-Solver++ 2M Karras": ("dpmsolver++", {"solver_order": 2, "use_karras_sigmas": True}),
}


def key(row: dict) -> str:
    return f"{row['family']}-{row['steps']}"


def run_row(model_path, row, n, args) -> tuple[dict, torch.Tensor]:
    scheduler, options = FAMILIES[row["family"]]
    sampler, _ = build_sampler(model_path, scheduler, device=torch.device("cpu"), scheduler_options=options)
    start = time.perf_counter()
    images = sample_images(sampler, n, row["steps"], 0.0, args.seed, args.batch_size, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    m = evaluate_images(images, seed=args.seed)
    result = {**row, "num_images": n, "seconds": round(seconds, 1),
              "ms_per_image_step": round(1000 * seconds / (n * row["steps"]), 3),
              "confident_share": m["confident_share"], "class_entropy": m["class_entropy"],
              "fd": m["fd"], "fd_real": m["fd_real"], "kid": m["kid"], "kid_real": m["kid_real"]}
    return result, images[:16]


def write_report(out: Path, report: dict) -> None:
    spread = report["real_spread"]
    ddim50 = next((r for r in report["rows"] if r["family"] == "DDIM" and r["steps"] == 50), None)
    table = []
    for r in report["rows"]:
        within = "-"
        if ddim50 is not None:
            within = "yes" if abs(r["kid"] - ddim50["kid"]) <= 2 * spread["kid_sd"] \
                and abs(r["fd"] - ddim50["fd"]) <= 2 * spread["fd_sd"] else "no"
        table.append([r["family"], r["steps"], r["num_images"], f"{r['fd']:.1f}", f"{r['kid']:.3f}",
                      f"{r['confident_share']:.3f}", f"{r['class_entropy']:.3f}", within,
                      f"{r['ms_per_image_step']:.2f}"])
    headers = ["sampler", "steps", "images", "FD (lower is better)", "KID (lower is better)", "confident (p>0.9)",
               "class entropy", "within 2 sd of DDIM 50 (FD and KID)",
               "ms / image / step (shared busy CPU, not a benchmark)"]
    text = ["# Experiment: DPM-Solver++ against DDIM at few steps\n",
            f"Model: `{report['model']}` (sha256 {report['model_sha256']}). {report['num_images']} images per row, "
            "the same seeds in every row (image i starts from the same noise x_T everywhere). FD: Frechet distance "
            f"to the {report['heldout']} held-out real digits in the digit classifier's 64-d feature space; KID: "
            "kernel distance on the same features. DDIM runs with the model's x0 clipping; DPM-Solver++ with "
            "diffusers' defaults (no thresholding, final sigma zero, lower-order final steps below 15 steps).\n",
            f"Noise of these estimates, from 20 random sets of {spread['n']} real training digits against the "
            f"held-out ones: FD {spread['fd_mean']:.1f} +- {spread['fd_sd']:.1f}, KID {spread['kid_mean']:.3f} +- "
            f"{spread['kid_sd']:.3f} (mean +- sd). 'Within 2 sd' compares a row with DDIM 50 against twice "
            "these sds.\n",
            common.markdown_table(headers, table), "",
            common.provenance_markdown(report["provenance"]), ""]
    common.write_text_atomic(out / f"{NAME}.md", "\n".join(text))


def write_figure(out: Path, report: dict, grids: dict) -> None:
    plt = common.pyplot()
    fig = plt.figure(figsize=(13, 7.5))
    gs = fig.add_gridspec(2, len(grids) or 1, height_ratios=[1.3, 1], hspace=0.3)
    ax_fd, ax_kid = fig.add_subplot(gs[0, :max(1, len(grids) // 2)]), fig.add_subplot(gs[0, max(1, len(grids) // 2):])
    spread = report["real_spread"]
    for family in FAMILIES:
        rs = sorted((r for r in report["rows"] if r["family"] == family), key=lambda r: r["steps"])
        if rs:
            s = [r["steps"] for r in rs]
            style = "s--" if family == "DDIM" else "o-"
            ax_fd.plot(s, [r["fd"] for r in rs], style, label=family)
            ax_kid.plot(s, [r["kid"] for r in rs], style, label=family)
    for ax, mean, sd, what in ((ax_fd, spread["fd_mean"], spread["fd_sd"], "FD"),
                               (ax_kid, spread["kid_mean"], spread["kid_sd"], "KID")):
        ax.axhspan(mean - 2 * sd, mean + 2 * sd, color="grey", alpha=0.25,
                   label=f"real vs real, n={spread['n']} (+-2 sd)")
        ax.set(xscale="log", xlabel="sampling steps", ylabel=f"{what} to held-out digits (lower is better)")
        from matplotlib.ticker import NullFormatter

        ax.set_xticks([5, 10, 15, 20, 50], labels=["5", "10", "15", "20", "50"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    from fastdiff.images import make_grid, to_uint8

    for i, (title, imgs) in enumerate(grids.items()):
        ax = fig.add_subplot(gs[1, i])
        ax.imshow(make_grid(to_uint8(imgs), ncols=4), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"DPM-Solver++ vs DDIM on the embedded digits model ({report['num_images']} images per point)")
    common.save_png(fig, out / f"{NAME}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="fastdiff checkpoint (default: the embedded model)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--steps", default="5,10,15,20,50")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated rows to run: " + ", ".join(FAMILIES))
    common.experiment_options(p, batch_size=128)
    args = common.parse_experiment_args(p, argv)
    steps = common.parse_ints(args.steps, "--steps")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"--families: unknown {sorted(unknown)}; choose from {list(FAMILIES)}")
    model_path = args.model or default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": os.path.relpath(model_path, common.REPO_ROOT) if args.model is None else model_path,
              "model_sha256": model_digest(model_path), "num_images": args.num_images, "seed": args.seed,
              "heldout": len(real_features("heldout")), "rows": [], "real_spread": real_spread(args.num_images)}
    json_path = out / f"{NAME}.json"
    done = {}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        if all(old.get(k) == report[k] for k in ("model_sha256", "num_images", "seed")):
            done = {key(r): r for r in old["rows"]}
    grids = {}
    command = "python bench/experiment_dpm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for family in families:
        for s in steps:
            row = {"family": family, "steps": s}
            if key(row) in done:
                report["rows"].append(done[key(row)])
                continue
            print(f"{key(row)}: {args.num_images} images", file=sys.stderr)
            result, first = run_row(model_path, row, args.num_images, args)
            report["rows"].append(result)
            grids[key(row)] = first
            report["provenance"] = common.provenance(torch.device("cpu"), argv, command)
            common.write_json_atomic(json_path, report)
            print(f"  FD {result['fd']:.1f}, KID {result['kid']:.3f}, confident {result['confident_share']:.3f}, "
                  f"{result['seconds']:.0f} s", file=sys.stderr)
    if "provenance" not in report:
        report["provenance"] = json.loads(json_path.read_text())["provenance"]
    write_report(out, report)
    shown_steps = 10 if 10 in steps else min(steps)
    picks = {}
    for family in families:  # the first 16 samples at 10 steps (sampled again if the rows were resumed)
        row = {"family": family, "steps": shown_steps}
        if key(row) not in grids:
            scheduler, options = FAMILIES[family]
            sampler, _ = build_sampler(model_path, scheduler, device=torch.device("cpu"), scheduler_options=options)
            grids[key(row)] = sample_images(sampler, 16, shown_steps, 0.0, args.seed, 16, progress=False)
        picks[f"{family}, {shown_steps} steps"] = grids[key(row)]
    write_figure(out, report, picks)
    print(f"wrote {out / (NAME + '.md')}, {json_path.name}, {NAME}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
