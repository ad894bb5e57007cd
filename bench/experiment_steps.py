"""Experiment 1, steps and stochasticity (after Song et al., 2021, "DDIM", Table 1).

Samples the same seeds with DDIM at several step counts and eta values, and with DDPM at every training
timestep, and scores each set with ``fastdiff.evaluate`` (confident share, class spread, Frechet distance to the
held-out digits in the digit classifier's feature space). Question: does deterministic DDIM (eta = 0) keep its
quality at few steps where the stochastic samplers (eta = 1, DDPM) lose it?

Writes ``docs/experiment_steps.{md,json,png}``. Each row is saved as soon as it is done; ``--resume`` keeps the
rows already in the JSON (same model and image counts), so an interrupted run continues.

    python bench/experiment_steps.py                       # 256 images per row, 64 for the 1000-step rows
    python bench/experiment_steps.py --num-images 64 --steps 10,20 --etas 0,1 --out /tmp/x   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from fastdiff.evaluate import (classify, evaluate_images, feature_scale, frechet_distance,  # noqa: E402
                               kernel_distance, real_features, sample_images)
from fastdiff.pipeline import build_sampler, default_model_dir, load_model, make_scheduler_for  # noqa: E402
from fastdiff.sampling import Sampler  # noqa: E402

NAME = "experiment_steps"


def model_digest(path: str) -> str:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def settings(steps: list[int], etas: list[float], T: int, noclip_steps: list[int]) -> list[dict]:
    """The rows: DDIM steps x eta, DDPM with every timestep, then deterministic DDIM without x0 clipping."""
    rows = [{"sampler": "ddim", "steps": s, "eta": e, "clip": True} for s in steps for e in etas]
    rows.append({"sampler": "ddpm", "steps": T, "eta": None, "clip": True})
    rows += [{"sampler": "ddim", "steps": s, "eta": 0.0, "clip": False} for s in noclip_steps]
    return rows


def key(row: dict) -> str:
    return f"{row['sampler']}-{row['steps']}-{row['eta']}" + ("" if row.get("clip", True) else "-noclip")


def label(row: dict) -> str:
    text = f"{row['sampler'].upper()} {row['steps']}" + ("" if row["eta"] is None else f", eta {row['eta']:g}")
    return text + ("" if row.get("clip", True) else ", no x0 clip")


def make_sampler(model_path: str, row: dict):
    """The row's sampler; ``clip: False`` turns off the x0 clipping stored in the model's scheduler config."""
    if row.get("clip", True):
        return build_sampler(model_path, row["sampler"], device=torch.device("cpu"))[0]
    model, trained, _ = load_model(model_path)
    return Sampler(model, make_scheduler_for(row["sampler"], {**trained, "clip_sample": False}))


def fd_at(images: torch.Tensor, n: int, seed: int) -> tuple[float, float]:
    """(Frechet distance of the first n images to the held-out digits, the same for n real training digits)."""
    _, feats = classify(images[:n])
    train = real_features("train")
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    held = real_features("heldout")
    return frechet_distance(feats, held), frechet_distance(train[subset], held)


def real_spread(n: int, repeats: int = 20) -> dict:
    """Mean and standard deviation of FD and KID for random sets of n real training digits vs the held-out ones:
    how much of a difference between two rows is sampling noise."""
    import statistics

    train, held, scale = real_features("train"), real_features("heldout"), feature_scale()
    fds, kids = [], []
    for r in range(repeats):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + r))[:n]
        fds.append(frechet_distance(train[idx], held))
        kids.append(kernel_distance(train[idx], held, scale))
    return {"n": n, "fd_mean": statistics.mean(fds), "fd_sd": statistics.stdev(fds),
            "kid_mean": statistics.mean(kids), "kid_sd": statistics.stdev(kids)}


def run_row(model_path, row, n, n_common, args) -> tuple[dict, torch.Tensor]:
    sampler = make_sampler(model_path, row)
    start = time.perf_counter()
    images = sample_images(sampler, n, row["steps"], row["eta"] or 0.0, args.seed, args.batch_size,
                           progress=not args.no_progress)
    seconds = time.perf_counter() - start
    m = evaluate_images(images, seed=args.seed)
    fd_common, fd_real_common = fd_at(images, n_common, args.seed)
    result = {**row, "num_images": n, "seconds": round(seconds, 1),
              "ms_per_image_step": round(1000 * seconds / (n * row["steps"]), 3),
              "confident_share": m["confident_share"], "class_entropy": m["class_entropy"],
              "min_class_share": m["min_class_share"], "max_class_share": m["max_class_share"],
              "class_counts": m["class_counts"], "fd": m["fd"], "fd_real": m["fd_real"],
              "kid": m["kid"], "kid_real": m["kid_real"],
              "fd_common": fd_common, "fd_real_common": fd_real_common, "n_common": n_common}
    return result, images[:16]


def write_report(out: Path, report: dict) -> None:
    rows = report["rows"]
    n_common = report["n_common"]
    table = []
    for r in rows:
        eta = "-" if r["eta"] is None else f"{r['eta']:g}"
        clip = "on" if r.get("clip", True) else "**off**"
        table.append([r["sampler"].upper(), r["steps"], eta, clip, r["num_images"], f"{r['confident_share']:.3f}",
                      f"{r['class_entropy']:.3f}", f"{r['min_class_share']:.3f} / {r['max_class_share']:.3f}",
                      f"{r['fd']:.1f} ({r['fd_real']:.1f})", f"{r['fd_common']:.1f} ({r['fd_real_common']:.1f})",
                      f"{r['kid']:.3f} ({r['kid_real']:.3f})", f"{r['ms_per_image_step']:.2f}"])
    headers = ["sampler", "steps", "eta", "x0 clip", "images", "confident (p>0.9)", "class entropy",
               "min / max class share",
               "FD, all images (real baseline)", f"FD, first {n_common} (real baseline)", "KID (real baseline)",
               "ms / image / step"]
    text = [f"# Experiment 1: steps and stochasticity\n",
            f"Model: `{report['model']}` (sha256 {report['model_sha256']}). Images per row: {report['num_images']} "
            f"({report['num_images_1000']} for the {report['T']}-step rows, to fit a 2-core CPU); the same seeds in "
            "every row, so image i starts from the same noise x_T everywhere. FD: Frechet distance to the "
            f"{report['heldout']} held-out real digits in the digit classifier's 64-d feature space; in brackets the "
            "same distance for as many real *training* digits (what a perfect sampler would score at that sample "
            f"size). FD is biased upwards for small sets, so only compare FDs of equal size: the column "
            f"'first {n_common}' uses the same number of images in every row. KID: the kernel distance (Binkowski et "
            "al., 2018) on the same features, unbiased, so rows of different sizes compare directly.\n",
            "Noise level of these estimates, from 20 random sets of real training digits against the held-out ones: "
            + "; ".join(f"n = {s['n']}: FD {s['fd_mean']:.1f} +- {s['fd_sd']:.1f}, KID {s['kid_mean']:.3f} +- "
                        f"{s['kid_sd']:.3f}" for s in report["real_spread"]) + ".\n",
            common.markdown_table(headers, table), "",
            common.provenance_markdown(report["provenance"]), ""]
    common.write_text_atomic(out / f"{NAME}.md", "\n".join(text))


def write_figure(out: Path, report: dict, grids: dict) -> None:
    plt = common.pyplot()
    rows = report["rows"]
    etas = sorted({r["eta"] for r in rows if r["eta"] is not None and r.get("clip", True)})
    fig = plt.figure(figsize=(13, 7.8))
    gs = fig.add_gridspec(2, 10, height_ratios=[1.25, 1], wspace=1.2, hspace=0.3)
    ax_kid, ax_conf = fig.add_subplot(gs[0, :5]), fig.add_subplot(gs[0, 5:])
    ddpm = [r for r in rows if r["sampler"] == "ddpm"]
    for eta in etas:
        rs = sorted((r for r in rows if r["eta"] == eta and r.get("clip", True)), key=lambda r: r["steps"])
        s = [r["steps"] for r in rs]
        ax_kid.plot(s, [r["kid"] for r in rs], "o-", label=f"DDIM eta={eta:g}")
        ax_conf.plot(s, [r["confident_share"] for r in rs], "o-", label=f"DDIM eta={eta:g}")
    rs = sorted((r for r in rows if not r.get("clip", True)), key=lambda r: r["steps"])
    if rs:
        s = [r["steps"] for r in rs]
        ax_kid.plot(s, [r["kid"] for r in rs], "s--", color="C0", mfc="none", label="DDIM eta=0, no x0 clip")
        ax_conf.plot(s, [r["confident_share"] for r in rs], "s--", color="C0", mfc="none",
                     label="DDIM eta=0, no x0 clip")
    for r in ddpm:
        ax_kid.plot([r["steps"]], [r["kid"]], "k*", ms=13, label=f"DDPM {r['steps']}")
        ax_conf.plot([r["steps"]], [r["confident_share"]], "k*", ms=13, label=f"DDPM {r['steps']}")
    spread = max(report["real_spread"], key=lambda s: s["n"])
    ax_kid.axhspan(spread["kid_mean"] - 2 * spread["kid_sd"], spread["kid_mean"] + 2 * spread["kid_sd"], color="grey",
                  alpha=0.25, label=f"real vs real, n={spread['n']} (+-2 sd)")
    ax_kid.set(xscale="log", xlabel="sampling steps",
               ylabel="kernel distance (KID) to held-out digits, lower is better")
    ax_conf.set(xscale="log", xlabel="sampling steps", ylabel="share classified with p > 0.9", ylim=(0, 1.02))
    for ax in (ax_kid, ax_conf):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for i, (title, imgs) in enumerate(list(grids.items())[:5]):
        ax = fig.add_subplot(gs[1, 2 * i:2 * i + 2])
        from fastdiff.images import make_grid, to_uint8

        ax.imshow(make_grid(to_uint8(imgs), ncols=4), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("DDIM steps x eta vs DDPM on the embedded digits model (same seeds in every panel)")
    common.save_png(fig, out / f"{NAME}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="fastdiff checkpoint (default: the embedded model)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--num-images-1000", type=int, default=64, help="images for rows with >= 1000 steps")
    p.add_argument("--steps", default="10,20,50,100,1000")
    p.add_argument("--etas", default="0,0.5,1")
    p.add_argument("--noclip-steps", default="10,100,1000",
                   help="extra rows: deterministic DDIM without x0 clipping at these step counts ('' for none)")
    common.experiment_options(p, batch_size=128)
    args = common.parse_experiment_args(p, argv)
    steps = common.parse_ints(args.steps, "--steps")
    etas = [float(e) for e in args.etas.split(",") if e.strip()]
    model_path = args.model or default_model_dir()
    sampler, _ = build_sampler(model_path, "ddpm")
    T = sampler.scheduler.num_train_timesteps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_common = min(args.num_images, args.num_images_1000)
    report = {"model": os.path.relpath(model_path, common.REPO_ROOT) if args.model is None else model_path,
              "model_sha256": model_digest(model_path), "num_images": args.num_images,
              "num_images_1000": args.num_images_1000, "n_common": n_common, "T": T, "seed": args.seed,
              "heldout": len(real_features("heldout")), "rows": [],
              "real_spread": [real_spread(n) for n in sorted({n_common, args.num_images})]}
    json_path = out / f"{NAME}.json"
    done = {}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        if all(old.get(k) == report[k] for k in ("model_sha256", "num_images", "num_images_1000", "seed")):
            done = {key(r): r for r in old["rows"]}
    grids = {}
    noclip = common.parse_ints(args.noclip_steps, "--noclip-steps") if args.noclip_steps.strip() else []
    for row in settings(steps, etas, T, noclip):
        n = args.num_images_1000 if row["steps"] >= 1000 else args.num_images
        if key(row) in done:
            report["rows"].append(done[key(row)])
            continue
        print(f"{key(row)}: {n} images", file=sys.stderr)
        result, first = run_row(model_path, row, n, n_common, args)
        report["rows"].append(result)
        grids[label(row)] = first
        report["provenance"] = common.provenance(torch.device("cpu"), argv, "python bench/experiment_steps.py "
                                                 + " ".join(sys.argv[1:] if argv is None else argv))
        common.write_json_atomic(json_path, report)
        print(f"  KID {result['kid']:.3f}, FD {result['fd']:.1f} (first {n_common}: {result['fd_common']:.1f}), "
              f"confident "
              f"{result['confident_share']:.3f}, {result['seconds']:.0f} s", file=sys.stderr)
    if "provenance" not in report:
        report["provenance"] = json.loads(json_path.read_text())["provenance"]
    write_report(out, report)
    # the figure shows the first 16 samples of a few rows (sampled again if the rows were resumed)
    shown = [{"sampler": "ddim", "steps": min(steps), "eta": min(etas), "clip": True},
             {"sampler": "ddim", "steps": min(steps), "eta": max(etas), "clip": True},
             {"sampler": "ddim", "steps": max(steps), "eta": min(etas), "clip": True},
             {"sampler": "ddpm", "steps": T, "eta": None, "clip": True}]
    if max(steps) in noclip:
        shown.insert(3, {"sampler": "ddim", "steps": max(steps), "eta": 0.0, "clip": False})
    picks = {}
    for row in shown:
        if label(row) not in grids:
            grids[label(row)] = sample_images(make_sampler(model_path, row), 16, row["steps"], row["eta"] or 0.0,
                                              args.seed, 16, progress=False)
        picks[label(row)] = grids[label(row)]
    write_figure(out, report, picks)
    print(f"wrote {out / (NAME + '.md')}, {json_path.name}, {NAME}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
