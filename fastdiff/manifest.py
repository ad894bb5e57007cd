"""The run manifest: what decides the pixels of a sampling run, stored beside its images.

``fastdiff sample --out DIR`` resumes an interrupted run by skipping the images already in ``DIR``. That is
only right when those images came from the same settings, so every run writes ``DIR/run.json``::

    {"fastdiff_run": 1,                      # format marker and version
     "model_sha256": "...",                  # hash of the weight tensors as sampled (names, dtypes, shapes, bytes)
     "scheduler": {...},                     # the scheduler's full diffusers-style config, class name included
     "steps": 50, "eta": 0.0, "seed": 0,
     "image_shape": [1, 16, 16], "dtype": "float32",
     "init_image_sha256": null, "strength": null,   # image-to-image: the prepared init tensor and strength
     "fastdiff_version": "0.1.0",
     "model": "...", "num_images": 64, "device": "cpu", "backend": "auto",   # recorded, not compared
     "extra": {}}                            # free-form: e.g. world_size, images_per_rank, images_per_second

A rerun whose compared fields (``COMPARED``) equal the stored ones resumes; any difference stops the run
before sampling with a one-line ``RunMismatchError`` naming each differing field, unless the caller asks to
overwrite, which first removes the old run's images, grid and manifest. The number of images, the batch
size, the device and the backend are recorded but not compared: image ``i`` depends only on
``(seed, i)``, whatever the batch or the number of processes, and devices and backends agree to float
rounding (at most 1/255 per pixel).

Multi-process runs: one process (rank 0) calls ``check_or_write`` before any sampling and the others wait
at a barrier; after the run, ``record`` adds what only the end knows (images/s) into ``extra``.

API: ``RunManifest.for_sampling(...)`` builds one, ``check_or_write(out_dir, overwrite)`` checks or starts a
run, ``RunManifest.read(out_dir)`` loads one, ``differences(other)`` lists what differs, ``write`` /
``record`` store it atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import torch

from .fileio import atomic_write_text, remove_stale_temporaries

MANIFEST_NAME = "run.json"
FORMAT_KEY = "fastdiff_run"
FORMAT_VERSION = 1
IMAGE_NAME = re.compile(r"\d{6,}\.png")  # what fastdiff.images.image_path writes
OUTPUT_NAMES = r"(\d{6,}\.png|grid\.png|run\.json)"  # every file a sampling run writes (for temp clean-up)


class RunMismatchError(ValueError):
    """An output folder holds images of another run (or of an unknown one)."""


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over sorted (name, dtype, shape, raw bytes) of the tensors: equal exactly when the values are."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's parameters and buffers (its ``state_dict``) as they are now."""
    return tensor_sha256(model.state_dict())


def scheduler_identity(scheduler) -> dict:
    """The scheduler's full configuration as a JSON-safe dict, its class name under "_class_name"."""
    if hasattr(scheduler, "to_diffusers_config"):
        return json.loads(json.dumps(scheduler.to_diffusers_config(), default=str))
    config = getattr(scheduler, "config", None)
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    return json.loads(json.dumps({"_class_name": type(scheduler).__name__, **fields}, default=str))


@dataclasses.dataclass
class RunManifest:
    """What decides the pixels of a sampling run (compared on resume) and what is only recorded."""

    model_sha256: str
    scheduler: dict  # diffusers-style scheduler config, "_class_name" included
    steps: int
    eta: float
    seed: int
    image_shape: tuple  # (C, H, W)
    dtype: str  # "float32", "float16", "bfloat16"
    init_image_sha256: str | None = None  # image-to-image only
    strength: float | None = None  # image-to-image only
    fastdiff_version: str = ""
    # recorded, not compared
    model: str | None = None  # where the weights came from (a path, or a description)
    num_images: int | None = None
    device: str | None = None
    backend: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. world_size, images_per_rank, images_per_second

    COMPARED = ("model_sha256", "scheduler", "steps", "eta", "seed", "image_shape", "dtype",
                "init_image_sha256", "strength", "fastdiff_version")

    def __post_init__(self):
        self.image_shape = tuple(int(v) for v in self.image_shape)
        if not self.fastdiff_version:
            from . import __version__

            self.fastdiff_version = __version__

    # ------------------------------------------------------------------ building
    @classmethod
    def for_sampling(cls, sampler, *, seed: int, steps: int, eta: float = 0.0, image_shape=None,
                     init: torch.Tensor | None = None, strength: float = 1.0, num_images: int | None = None,
                     model: str | None = None, **extra) -> "RunManifest":
        """The manifest of ``generate(sampler, ...)`` with these settings; ``extra`` goes to ``.extra``."""
        return cls(
            model_sha256=model_sha256(sampler.model),
            scheduler=scheduler_identity(sampler.scheduler),
            steps=int(steps), eta=float(eta), seed=int(seed),
            image_shape=tuple(image_shape or sampler.image_shape),
            dtype=str(sampler.dtype).replace("torch.", ""),
            init_image_sha256=None if init is None else tensor_sha256({"init": init.float()}),
            strength=None if init is None else float(strength),
            model=model, num_images=num_images, device=str(sampler.device),
            backend=getattr(sampler, "backend", None), extra=dict(extra),
        )

    # ------------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return {FORMAT_KEY: FORMAT_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "RunManifest":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, out_dir) -> "RunManifest | None":
        """The manifest in ``out_dir``, None if there is none; ValueError naming the file if it is unreadable."""
        path = os.path.join(os.fspath(out_dir), MANIFEST_NAME)
        if not os.path.lexists(path):
            return None
        try:
            with open(path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get(FORMAT_KEY) != FORMAT_VERSION:
                raise ValueError(f"not a fastdiff run manifest (version {FORMAT_VERSION})")
            return cls.from_dict(doc)
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise RunMismatchError(f"cannot read the run manifest {path} ({_first_line(exc)}); "
                                   "remove it, or overwrite the run") from None

    def write(self, out_dir) -> str:
        path = os.path.join(os.fspath(out_dir), MANIFEST_NAME)
        atomic_write_text(path, self.to_json())
        return path

    def record(self, out_dir, **extra) -> str:
        """Add ``extra`` entries (e.g. ``images_per_second``) and rewrite the manifest."""
        self.extra.update(extra)
        return self.write(out_dir)

    # ------------------------------------------------------------------ comparing
    def differences(self, other: "RunManifest") -> list[str]:
        """One readable entry per compared field that differs: ``"steps 50 -> 20"`` (self -> other)."""
        out = []
        for name in self.COMPARED:
            old, new = getattr(self, name), getattr(other, name)
            if name == "scheduler":
                keys = sorted(set(old) | set(new), key=lambda k: (k != "_class_name", k))
                out += [f"scheduler {k} {_short(old.get(k))} -> {_short(new.get(k))}"
                        for k in keys if old.get(k) != new.get(k)]
            elif old != new:
                out.append(f"{name.replace('_sha256', '')} {_short(old)} -> {_short(new)}")
        return out

    def check_or_write(self, out_dir, overwrite: bool = False) -> str:
        """Start or resume the run in ``out_dir``; returns "new", "resume" or "overwritten".

        Raises ``RunMismatchError`` (one line, naming each differing field) when ``out_dir`` holds another
        run, or images with no manifest, unless ``overwrite``: then the old images, grid and manifest are
        removed first (nothing else in the folder is touched). Stale temporary files of an interrupted run
        are removed either way.
        """
        out_dir = os.fspath(out_dir)
        remove_stale_temporaries(out_dir, OUTPUT_NAMES)
        if overwrite:
            removed = remove_run_outputs(out_dir)
            self.write(out_dir)
            return "overwritten" if removed else "new"
        stored = RunManifest.read(out_dir)
        if stored is None:
            images = existing_images(out_dir)
            if images:
                raise RunMismatchError(
                    f"{out_dir} already holds {len(images)} images but no run manifest ({MANIFEST_NAME}), so "
                    "they may come from other settings; overwrite them (--overwrite) or choose another output folder")
            self.write(out_dir)
            return "new"
        diffs = stored.differences(self)
        if diffs:
            raise RunMismatchError(
                f"{out_dir} holds a run with other settings ({'; '.join(diffs)}); rerun with the same settings "
                "to resume, overwrite it (--overwrite), or choose another output folder")
        stored_n = stored.num_images or 0
        self.num_images = max(stored_n, self.num_images or 0) or None
        self.extra = {**stored.extra, **self.extra}
        self.write(out_dir)
        return "resume"


def existing_images(out_dir) -> list[str]:
    """Names of the numbered images (``000123.png``) in ``out_dir``: files only (a folder of that name is
    reported by ``generate``, never deleted)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir)
                  if IMAGE_NAME.fullmatch(n) and not os.path.isdir(os.path.join(out_dir, n)))


def remove_run_outputs(out_dir) -> list[str]:
    """Delete a sampling run's numbered images, grid.png and manifest from ``out_dir``; returns their names."""
    names = existing_images(out_dir)
    for extra in ("grid.png", MANIFEST_NAME):
        if os.path.lexists(os.path.join(out_dir, extra)):
            names.append(extra)
    removed = []
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.islink(path) or not os.path.isdir(path):  # a folder of that name is the user's: reported, kept
            os.unlink(path)
            removed.append(name)
    return removed


def _short(value) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12]
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else str(list(value))
    return repr(value) if isinstance(value, str) else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
