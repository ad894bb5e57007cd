"""Where a sampling run's images go: PNG files (flat or in subfolders of 1,000) or npz shards, written by a
bounded background writer so the device never waits for PNG encoding or the disk.

Formats and layouts::

    png, flat         out/000000.png, out/000001.png, ...               (the default for up to 10,000 images)
    png, subfolders   out/000000/000000.png ... out/001000/001000.png   (1,000 images a folder; auto above 10,000)
    npz               out/samples_000000_256.npz, ...                   one shard per batch: "arr_0" uint8
                                                                        [N, H, W, C] (what FID tools read) and
                                                                        "indices" int64 [N] (the images' numbers)

The format and layout of a run are stored in its manifest (``run.json``, ``extra["output"]``), so a rerun
resumes in the same layout whatever ``--layout auto`` would choose for it. Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import images as imageio
from .fileio import atomic_write, remove_stale_temporaries

log = logging.getLogger("fastdiff.output")

FORMATS = ("png", "npz")
LAYOUTS = ("auto", "flat", "subfolders")
SUBFOLDER_SIZE = 1000  # images per subfolder
AUTO_SUBFOLDERS_ABOVE = 10_000  # --layout auto: subfolders for runs of more images than this
WRITER_THREADS = 8  # PNG files written at once: each atomic write waits ~15 ms in fsync, threads overlap that
GRID_MAX_IMAGES = 256  # the grid shows the first images only (a 50,000-image grid would be a gigapixel picture)
SHARD_NAME = re.compile(r"samples_(\d{6,})_(\d+)\.npz")
SUBFOLDER_NAME = re.compile(r"\d{6,}")
LEGACY_OUTPUT = {"format": "png", "layout": "flat"}  # runs whose manifest predates these options


def resolve_layout(layout: str, num_images: int) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not supported; choose one of {LAYOUTS}")
    if layout == "auto":
        return "subfolders" if num_images > AUTO_SUBFOLDERS_ABOVE else "flat"
    return layout


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; choose one of {FORMATS}")
    return fmt


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] floats in [-1, 1] -> uint8 [N, H, W, C] on the same device (``images.to_uint8``'s rounding)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


class ImageStore:
    """The images of one run on disk: which exist, writing new ones, reading them back."""

    def __init__(self, out_dir: str, image_shape, fmt: str = "png", layout: str = "flat"):
        self.out_dir = os.fspath(out_dir)
        self.image_shape = tuple(image_shape)
        self.format = check_format(fmt)
        if layout not in ("flat", "subfolders"):
            raise ValueError(f"layout must be flat or subfolders here, got {layout!r}")
        self.layout = layout

    @classmethod
    def for_run(cls, out_dir: str, image_shape) -> "ImageStore":
        """The store of the run in ``out_dir``, in the format and layout its manifest records."""
        from .manifest import RunManifest

        stored = RunManifest.read(out_dir)
        output = stored_output(stored) if stored is not None else LEGACY_OUTPUT
        return cls(out_dir, image_shape, output["format"], output["layout"])

    # ------------------------------------------------------------------ names
    def png_path(self, index: int) -> str:
        if self.layout == "subfolders":
            folder = os.path.join(self.out_dir, f"{index // SUBFOLDER_SIZE * SUBFOLDER_SIZE:06d}")
            return os.path.join(folder, f"{index:06d}.png")
        return imageio.image_path(self.out_dir, index)

    def shard_paths(self) -> list[str]:
        if not os.path.isdir(self.out_dir):
            return []
        return sorted(os.path.join(self.out_dir, n) for n in os.listdir(self.out_dir) if SHARD_NAME.fullmatch(n))

    def subfolders(self) -> list[str]:
        if not os.path.isdir(self.out_dir):
            return []
        return sorted(os.path.join(self.out_dir, n) for n in os.listdir(self.out_dir)
                      if SUBFOLDER_NAME.fullmatch(n) and os.path.isdir(os.path.join(self.out_dir, n)))

    # ------------------------------------------------------------------ what exists
    def missing(self, indices) -> tuple[list[int], list[str]]:
        """(indices with no complete image, unreadable files among them to be replaced); indices in order."""
        indices = list(indices)
        if self.format == "npz":
            present = self.shard_indices()
            return [i for i in indices if i not in present], []
        todo, broken = [], []
        for i in indices:
            path = self.png_path(i)
            if not os.path.lexists(path):
                todo.append(i)
            elif os.path.isdir(path):
                raise ValueError(f"{path} is a folder, not an image; move it out of the output folder")
            elif not imageio.is_sample_png(path, self.image_shape):
                log.warning("%s is not a readable %s PNG; drawing it again", path, "x".join(map(str, self.image_shape)))
                todo.append(i)
                broken.append(path)
        return todo, broken

    def shard_indices(self) -> set[int]:
        """The image indices held by the shards (reads only each shard's small "indices" array)."""
        present = set()
        for path in self.shard_paths():
            try:
                with np.load(path) as shard:
                    present.update(int(i) for i in shard["indices"])
            except (OSError, ValueError, KeyError, EOFError) as exc:
                raise ValueError(f"cannot read the shard {path} ({exc}); remove it to draw its images again") from None
        return present

    def verify_shards(self) -> list[str]:
        """Remove shards that cannot be read whole (an interrupted copy, a truncated file); returns their paths.
        Run by one process before the others look (their images are then drawn again)."""
        broken = []
        for path in self.shard_paths():
            try:
                with np.load(path) as shard:
                    pictures, indices = shard["arr_0"], shard["indices"]
                ok = (pictures.dtype == np.uint8 and pictures.ndim == 4 and indices.shape == (pictures.shape[0],)
                      and pictures.shape[1:] == (self.image_shape[1], self.image_shape[2], self.image_shape[0]))
            except Exception:  # noqa: BLE001 - any failure to read means the shard is not usable
                ok = False
            if not ok:
                log.warning("%s is not a readable shard of %s images; drawing its images again", path,
                            "x".join(map(str, self.image_shape)))
                os.unlink(path)
                broken.append(path)
        return broken

    def other_layout_outputs(self) -> list[str]:
        """Image files of this store's kinds that ``fastdiff.manifest`` does not see (subfolder PNGs, shards)."""
        found = list(self.shard_paths())
        for folder in self.subfolders():
            found += [os.path.join(folder, n) for n in os.listdir(folder) if re.fullmatch(r"\d{6,}\.png", n)]
        return found

    # ------------------------------------------------------------------ writing and reading
    def write(self, indices, pictures: np.ndarray, executor=None) -> list[str]:
        """Write uint8 [N, H, W, C] ``pictures`` of image ``indices``; returns the files written.

        ``executor`` (a ThreadPoolExecutor): PNGs are encoded and written in parallel (each atomic write ends
        with an fsync, ~15 ms of waiting per file that threads overlap; PIL's encoder releases the GIL).
        """
        indices = [int(i) for i in indices]
        if self.format == "npz":
            path = os.path.join(self.out_dir, f"samples_{indices[0]:06d}_{len(indices)}.npz")

            def save(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, arr_0=pictures, indices=np.asarray(indices, dtype=np.int64))

            atomic_write(path, save)
            return [path]
        if executor is not None and len(indices) > 1:
            return list(executor.map(self._write_png, indices, pictures))
        return [self._write_png(index, picture) for index, picture in zip(indices, pictures)]

    def _write_png(self, index: int, picture: np.ndarray) -> str:
        path = self.png_path(index)
        imageio.save_png_atomic(imageio.pil_image(picture), path)
        return path

    def load(self, indices) -> np.ndarray:
        """uint8 [N, H, W, C] of image ``indices`` (for the grid and for tests)."""
        indices = [int(i) for i in indices]
        if self.format == "png":
            if self.layout == "flat":
                return imageio.load_png_folder(self.out_dir, indices)
            return np.stack([imageio.load_png_folder(os.path.dirname(self.png_path(i)), [i])[0] for i in indices])
        found = {}
        wanted = set(indices)
        for path in self.shard_paths():
            with np.load(path) as shard:
                for k, i in enumerate(shard["indices"].tolist()):
                    if i in wanted:
                        found[i] = shard["arr_0"][k]
        missing = [i for i in indices if i not in found]
        if missing:
            raise ValueError(f"no shard in {self.out_dir} holds image {missing[0]}")
        return np.stack([found[i] for i in indices])

    def remove_outputs(self) -> list[str]:
        """Delete subfolder PNGs and shards (the flat PNGs, grid and manifest are fastdiff.manifest's)."""
        removed = self.other_layout_outputs()
        for path in removed:
            os.unlink(path)
        for folder in self.subfolders():
            if not os.listdir(folder):
                os.rmdir(folder)
        return removed

    def remove_stale_temporaries(self) -> None:
        remove_stale_temporaries(self.out_dir, SHARD_NAME.pattern)
        for folder in self.subfolders():
            remove_stale_temporaries(folder, r"\d{6,}\.png")


def stored_output(manifest) -> dict:
    """{"format", "layout"} of a stored run (runs from before these options: PNG, flat)."""
    output = manifest.extra.get("output") if manifest is not None else None
    return dict(output) if isinstance(output, dict) else dict(LEGACY_OUTPUT)


def start_run(out_dir: str, manifest, fmt: str, layout: str, num_images: int, overwrite: bool) -> dict:
    """Check or start the run in ``out_dir`` (one process, before any other looks): the manifest check of
    ``fastdiff.manifest`` extended to the format, the layout, subfolder PNGs and shards. Returns the output
    settings {"format", "layout"} recorded in the manifest; a resumed run keeps its stored ones.
    """
    from .manifest import RunManifest, RunMismatchError

    check_format(fmt)
    requested = resolve_layout(layout, num_images)
    stored = RunManifest.read(out_dir)
    probe = ImageStore(out_dir, manifest.image_shape, fmt, requested)
    if overwrite:
        probe.remove_outputs()
        output = {"format": fmt, "layout": requested}
    elif stored is None:
        found = probe.other_layout_outputs()
        if found:
            raise RunMismatchError(f"{out_dir} already holds {len(found)} image files but no run manifest "
                                   "(run.json), so they may come from other settings; overwrite them (--overwrite) "
                                   "or choose another output folder")
        output = {"format": fmt, "layout": requested}
    else:
        output = stored_output(stored)
        if output["format"] != fmt:
            raise RunMismatchError(f"{out_dir} holds a run written as --format {output['format']}; rerun with "
                                   f"--format {output['format']} to resume, overwrite it (--overwrite), or choose "
                                   "another output folder")
        if layout != "auto" and fmt == "png" and output["layout"] != layout:
            raise RunMismatchError(f"{out_dir} holds a run in the {output['layout']} layout; rerun with --layout "
                                   f"{output['layout']} (or auto) to resume, or overwrite it (--overwrite)")
    manifest.extra["output"] = output
    manifest.check_or_write(out_dir, overwrite)
    store = ImageStore(out_dir, manifest.image_shape, output["format"], output["layout"])
    store.remove_stale_temporaries()
    if output["format"] == "npz":
        store.verify_shards()
    return output


class BackgroundWriter:
    """Encodes and writes batches on a thread while the caller samples the next ones.

    ``submit`` converts a batch to uint8 on its device (4x fewer bytes to move), starts the copy to the host
    (on CUDA: into pinned memory with ``non_blocking=True``, so the device goes on with the next batch) and
    queues it; it blocks only when ``max_pending`` batches are already waiting (bounded memory). The thread
    waits for the copy, checks the batch (``check``), writes it through the store, its PNGs spread over
    ``workers`` threads. An error in the thread is
    raised by the next ``submit`` or by ``close``; ``close(abort=True)`` drops what is still queued, lets the
    file being written finish, and returns (only complete files stay).
    """

    def __init__(self, store: ImageStore, max_pending: int = 2, workers: int = WRITER_THREADS):
        if max_pending < 1 or workers < 1:
            raise ValueError(f"max_pending and workers must be >= 1, got {max_pending} and {workers}")
        self.store = store
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fastdiff-png") if workers > 1 else None
        self.written: list[str] = []
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastdiff-writer", daemon=True)
        self._thread.start()

    def submit(self, images: torch.Tensor, indices, check=None) -> None:
        """Queue ``images`` [N, C, H, W] in [-1, 1] for writing as image ``indices``.

        ``check(finite)`` runs on the writer thread with a host bool tensor [N] (whether each image is finite)
        and raises to refuse the batch (nothing of it is written).
        """
        self._raise_if_failed()
        pictures = to_uint8_nhwc(images)
        finite = torch.isfinite(images.detach()).flatten(1).all(1)
        event = None
        if pictures.is_cuda:
            host = torch.empty(pictures.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pictures, non_blocking=True)
            host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            host_finite.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pictures, finite = host, host_finite
        else:
            pictures, finite = pictures.cpu(), finite.cpu()
        self._queue.put((pictures, finite, event, [int(i) for i in indices], check))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None or self._abort.is_set():
                continue  # drain: the caller learns of the error at its next submit or close
            pictures, finite, event, indices, check = item
            try:
                if event is not None:
                    event.synchronize()
                if check is not None:
                    check(finite)
                self.written += self.store.write(indices, pictures.numpy(), executor=self._pool)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            self._abort.set()
            raise error

    def close(self, abort: bool = False) -> list[str]:
        """Wait for the queued batches (``abort``: drop them), stop the thread; returns the files written."""
        if abort:
            self._abort.set()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if not abort:
            self._raise_if_failed()
        return self.written

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(abort=exc_type is not None)
