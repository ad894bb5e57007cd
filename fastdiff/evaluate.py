"""Sample quality for digit models: a small classifier trained on the real digits, and metrics from it.

Metrics on a batch of generated images (``evaluate_images``):

* ``confident_share``: share of images the classifier assigns to one class with probability > 0.9;
* ``class_counts``, ``class_entropy`` (entropy of the predicted-class histogram divided by log 10: 1 means
  all ten classes equally often, 0 means a single class), ``min_class_share`` / ``max_class_share``;
* ``fd``: the Frechet distance (Heusel et al., 2017, as in FID) between Gaussians fitted to the classifier's
  penultimate features of the generated images and of the held-out real digits, with ``fd_real`` beside
  it: the same distance for an equally large random subset of the real *training* digits against the
  held-out ones. ``fd`` close to ``fd_real`` means the samples are as close to unseen real digits as other
  real digits are (the distance is biased upwards for small sets, hence the equal sizes). ``kid`` is the
  kernel distance of Binkowski et al. (2018) on the same features: unbiased, so it compares across set sizes.

The classifier's weights ship as ``fastdiff/data/digits_classifier.safetensors`` (+ ``.json``);
``fastdiff eval --train-classifier`` rebuilds them deterministically into a file of your choice
(``--classifier-out``, default ``./digits_classifier.safetensors``; the installed package is never written
to), and ``--classifier PATH`` evaluates with such a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import _Parser, check_output_file, seed_int
from .data import DATA_DIR, load_digits
from .devices import resolve_device
from .fileio import atomic_write, atomic_write_text

CLASSIFIER_PATH = os.path.join(DATA_DIR, "digits_classifier.safetensors")  # shipped; read only
USER_CLASSIFIER_NAME = "digits_classifier.safetensors"  # --train-classifier's default: the current folder
CLASSIFIER_SIZE = 16  # images are resized to 16x16 greyscale before classification
FEATURE_DIM = 64  # width of the penultimate layer whose activations the Frechet distance compares
CONFIDENCE = 0.9
NUM_CLASSES = 10


class DigitClassifier(nn.Module):
    """Three 3x3 conv layers (32, 32, 64 channels, two 2x2 max-pools) -> 64 features -> 10 logits."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 16, 16] in [-1, 1] -> penultimate activations [N, feature_dim] (after ReLU)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """Any [N, C, H, W] in [-1, 1] -> [N, 1, 16, 16] float32 (channel mean, antialiased resize, clamp)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W], got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > CLASSIFIER_SIZE)
    return x.contiguous()


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift], filling with -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offs.tolist())])


def train_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3) -> DigitClassifier:
    """Train the classifier on the real training split (random 1-pixel shifts, light noise); deterministic."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits("train", CLASSIFIER_SIZE)
    x_all, y_all = data.images, data.labels
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x = _random_shift(x_all[idx], 1, gen)
            x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: str, info: dict | None = None) -> None:
    """Weights to ``path`` (safetensors) and a description to the same name with ``.json``, atomically."""
    from safetensors.torch import save_file

    base = os.path.splitext(path)[0]
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(base + ".safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {"architecture": "DigitClassifier", "input_size": CLASSIFIER_SIZE, "feature_dim": FEATURE_DIM,
            "num_classes": NUM_CLASSES, **(info or {})}
    atomic_write_text(base + ".json", json.dumps(meta, indent=2) + "\n")


_classifier_cache: dict[str, DigitClassifier] = {}


def load_classifier(path: str = CLASSIFIER_PATH) -> DigitClassifier:
    """The shipped (or given) classifier on the CPU in eval mode; cached per path."""
    if path in _classifier_cache:
        return _classifier_cache[path]
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"digit classifier weights not found at {path!r} "
                                "(rebuild them with `fastdiff eval --train-classifier`)")
    meta_path = os.path.splitext(path)[0] + ".json"
    feature_dim = FEATURE_DIM
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            feature_dim = json.load(f).get("feature_dim", FEATURE_DIM)
    model = DigitClassifier(feature_dim)
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"classifier weights {path!r} do not match: missing {missing}, unexpected {unexpected}")
    model.eval()
    _classifier_cache[path] = model
    return model


@torch.no_grad()
def classify(images: torch.Tensor, classifier: DigitClassifier | None = None, batch_size: int = 512):
    """(probabilities [N, 10], features [N, feature_dim]) for images in [-1, 1], float64 on the CPU."""
    classifier = classifier or load_classifier()
    x = prepare_images(images)
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = classifier.features(x[i:i + batch_size])
        feats.append(f.double())
        probs.append(F.softmax(classifier.fc2(f), dim=1).double())
    return torch.cat(probs), torch.cat(feats)


def accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier | None = None) -> float:
    probs, _ = classify(images, classifier)
    return (probs.argmax(1) == labels.cpu()).double().mean().item()


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets.

    Tr (S_a S_b)^(1/2) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix, so no
    general matrix square root (and no scipy) is needed.
    """
    mu_a, cov_a = gaussian_stats(feat_a)
    mu_b, cov_b = gaussian_stats(feat_b)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_cross
    return max(fd.item(), 0.0)


def kernel_distance(feat_a: torch.Tensor, feat_b: torch.Tensor, scale: float = 1.0) -> float:
    """Unbiased squared MMD with the kernel k(x, y) = (x.y / D + 1)^3 on features divided by ``scale`` (the KID
    of Binkowski et al., 2018).

    Unlike the Frechet distance it has no bias from the sample size, so sets of different sizes compare
    directly (smaller sets only make it noisier); it can be slightly negative for two samples of one distribution.
    """
    a, b = feat_a.double() / scale, feat_b.double() / scale
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need features [N >= 2, D] of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[1]
    k_aa = (a @ a.T / d + 1) ** 3
    k_bb = (b @ b.T / d + 1) ** 3
    k_ab = (a @ b.T / d + 1) ** 3
    m, n = len(a), len(b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return (within_a + within_b - 2 * k_ab.mean()).item()


_real_features: "weakref.WeakKeyDictionary[DigitClassifier, dict]" = weakref.WeakKeyDictionary()


def real_features(split: str, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Classifier features of the real digits of ``split`` ("train" or "heldout"), cached."""
    classifier = classifier or load_classifier()
    cache = _real_features.setdefault(classifier, {})
    if split not in cache:
        cache[split] = classify(load_digits(split, CLASSIFIER_SIZE).images, classifier)[1]
    return cache[split]


def feature_scale(classifier: DigitClassifier | None = None) -> float:
    """RMS of the held-out digits' features: the kernel distance divides features by it (a unit per classifier)."""
    return real_features("heldout", classifier).square().mean().sqrt().item()


def evaluate_images(images: torch.Tensor, classifier: DigitClassifier | None = None, seed: int = 0) -> dict:
    """Quality metrics (see the module docstring) of generated images [N, C, H, W] in [-1, 1]."""
    classifier = classifier or load_classifier()
    probs, feats = classify(images, classifier)
    n = probs.shape[0]
    conf, pred = probs.max(1)
    counts = torch.bincount(pred, minlength=NUM_CLASSES)
    share = counts.double() / n
    nz = share[share > 0]
    entropy = -(nz * nz.log()).sum().item() / math.log(NUM_CLASSES)
    metrics = {
        "num_images": n,
        "confident_share": (conf > CONFIDENCE).double().mean().item(),
        "mean_confidence": conf.mean().item(),
        "class_counts": counts.tolist(),
        "class_entropy": entropy,
        "min_class_share": share.min().item(),
        "max_class_share": share.max().item(),
    }
    if n >= 2:
        heldout = real_features("heldout", classifier)
        train = real_features("train", classifier)
        gen = torch.Generator().manual_seed(seed)
        subset = torch.randperm(len(train), generator=gen)[:max(2, min(n, len(train)))]
        metrics["fd"] = frechet_distance(feats, heldout)
        metrics["fd_real"] = frechet_distance(train[subset], heldout)
        metrics["fd_real_n"] = len(subset)
        scale = feature_scale(classifier)
        metrics["kid"] = kernel_distance(feats, heldout, scale)
        metrics["kid_real"] = kernel_distance(train[subset], heldout, scale)
    return metrics


def format_metrics(m: dict) -> str:
    """A few readable lines for the terminal."""
    lines = [
        f"images                 {m['num_images']}",
        f"confident (p > {CONFIDENCE})     {m['confident_share']:.3f}   "
        f"(mean top probability {m['mean_confidence']:.3f})",
        f"class counts 0..9      {' '.join(str(c) for c in m['class_counts'])}",
        f"class entropy / log10  {m['class_entropy']:.3f}   (min share {m['min_class_share']:.3f}, "
        f"max share {m['max_class_share']:.3f}; uniform = 0.100)",
    ]
    if "fd" in m:
        lines.append(f"Frechet distance       {m['fd']:.2f}   to held-out real digits "
                     f"(real train vs held-out, n={m['fd_real_n']}: {m['fd_real']:.2f})")
        lines.append(f"kernel distance (KID)  {m['kid']:.4f}   (real train vs held-out: {m['kid_real']:.4f}; "
                     "unbiased, comparable across sample sizes)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Sampling for evaluation, and the command line
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(sampler, num_images: int, steps: int, eta: float = 0.0, seed: int = 0, batch_size: int = 128,
                  progress: bool = True) -> torch.Tensor:
    """``num_images`` samples [N, C, H, W] (image i depends only on (seed, i)), kept in memory on the CPU."""
    from tqdm.auto import tqdm

    from .sampling import image_seeds

    out = []
    batches = [range(i, min(i + batch_size, num_images)) for i in range(0, num_images, batch_size)]
    with tqdm(total=len(batches) * steps, unit="step", disable=not progress, desc=f"{num_images} images") as bar:
        for idx in batches:
            x = sampler.sample(image_seeds(seed, idx), steps=steps, eta=eta, on_step=lambda: bar.update(1))
            out.append(x.float().cpu())
    return torch.cat(out)


def _numbered_pngs(folder: str) -> list[str]:
    from .data import list_images

    paths = list_images(folder)
    numbered = [p for p in paths if os.path.splitext(os.path.basename(p))[0].isdigit()]
    return numbered or paths


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastdiff eval", description="Sample-quality metrics for digit models: "
                "classifier confidence, class spread, Frechet distance to held-out digits.")
    p.add_argument("--model", default=None, help="checkpoint to sample from (default: the embedded model)")
    p.add_argument("--images", default=None, help="evaluate the numbered PNGs in this folder instead of sampling")
    p.add_argument("--num-images", type=int, default=512, help="images to sample or read")
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim", help="sampler")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: ddim 50, ddpm all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    p.add_argument("--seed", type=seed_int, default=0, help="base seed of the samples")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", default=None, help="also write the metrics as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--classifier", default=CLASSIFIER_PATH, help="digit classifier weights to evaluate with "
                   "(default: the shipped ones)")
    p.add_argument("--train-classifier", action="store_true",
                   help="retrain the digit classifier into --classifier-out, then exit")
    p.add_argument("--classifier-out", default=USER_CLASSIFIER_NAME,
                   help="where --train-classifier writes the weights (and a .json beside them)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_classifier:
        out = check_output_file(args.classifier_out, "--classifier-out")
        if not out.endswith(".safetensors"):
            raise ValueError(f"--classifier-out {out} must end in .safetensors")
        start = time.time()
        model = train_classifier()
        held = load_digits("heldout", CLASSIFIER_SIZE)
        acc = accuracy(held.images, held.labels, model)
        save_classifier(model, out, info={"trained_on": "digits train split (split seed 0), 16x16", "train_seed": 0,
                                          "epochs": 30, "heldout_accuracy": round(acc, 4),
                                          "rebuild": "fastdiff eval --train-classifier"})
        print(f"classifier trained in {time.time() - start:.0f} s; held-out accuracy {acc:.4f}; written to {out} "
              f"(evaluate with it: fastdiff eval --classifier {out})")
        return 0
    if args.json is not None:
        check_output_file(args.json, "--json")
    classifier = load_classifier(args.classifier)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta}")
    start = time.time()
    if args.images is not None:
        from .data import load_image

        paths = _numbered_pngs(args.images)[:args.num_images]
        if not paths:
            raise ValueError(f"no images in {args.images!r}")
        images = torch.stack([load_image(p, CLASSIFIER_SIZE, 1) for p in paths])
        source = f"{len(paths)} images from {args.images}"
    else:
        from .pipeline import build_sampler, default_steps

        device = resolve_device(args.device)
        sampler, description = build_sampler(args.model, args.scheduler, device=device)
        steps = args.steps or default_steps(args.scheduler, sampler)
        images = sample_images(sampler, args.num_images, steps, args.eta, args.seed, args.batch_size,
                               progress=not args.no_progress)
        source = f"{description}; {args.scheduler} {steps} steps, eta {args.eta}, seed {args.seed}"
    metrics = evaluate_images(images, classifier, seed=args.seed)
    metrics["source"] = source
    metrics["seconds"] = round(time.time() - start, 1)
    print(source)
    print(format_metrics(metrics))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
