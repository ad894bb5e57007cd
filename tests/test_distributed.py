"""Batch generation across processes (torchrun, gloo on the CPU) and the output writer (PNG, npz, subfolders).

The multi-process tests start real ``torchrun --standalone --nproc-per-node 2 -m fastdiff sample ... --device cpu``
runs on a tiny checkpoint (8x8 images, 3 steps) and compare them with a single process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_checkpoint

from fastdiff import cli, output
from fastdiff.distributed import Ranks, from_environment
from fastdiff.images import is_sample_png
from fastdiff.manifest import RunManifest, RunMismatchError
from fastdiff.sampling import NonFiniteOutputError, Sampler, generate
from fastdiff.schedulers import DDIMScheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--num-images", "7", "--batch-size", "2", "--steps", "3", "--device", "cpu", "--no-progress"]
TEMPORARY = re.compile(r"\..*\.tmp")


def fastdiff_command(args, nproc=None, timeout=600):
    """``python -m fastdiff ARGS``, or the same under ``torchrun --standalone --nproc-per-node NPROC``."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    return subprocess.run([*launcher, "-m", "fastdiff", "sample", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def run_report(result, out_dir) -> str:
    """What a failed run left: its exit status, the end of both streams and the files in ``out_dir`` (whether a
    rank failed mid-run or after writing everything)."""
    files = sorted(os.path.relpath(os.path.join(root, f), out_dir) for root, _, names in os.walk(out_dir)
                   for f in names) if os.path.isdir(out_dir) else []
    return (f"exit status {result.returncode}\nstdout: {result.stdout[-1000:]}\nstderr: {result.stderr[-3000:]}\n"
            f"files in {out_dir}: {files}")


def pixels(out_dir, indices):
    return output.ImageStore.for_run(str(out_dir), (3, 8, 8)).load(indices)


def leftovers(out_dir):
    """Temporary files and flags a run must never leave behind (searched in subfolders too)."""
    found = []
    for root, _, files in os.walk(out_dir):
        found += [os.path.join(root, f) for f in files if TEMPORARY.fullmatch(f) or f == ".fastdiff-abort"]
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and one 2-rank run of the same 7 images (batch 2: rank 0 draws 0,1,4,5)."""
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_checkpoint(str(root / "model"))
    single = fastdiff_command(["--model", model, "--out", str(root / "single"), *RUN])
    assert single.returncode == 0, single.stderr
    two = fastdiff_command(["--model", model, "--out", str(root / "two"), *RUN], nproc=2)
    assert two.returncode == 0, run_report(two, root / "two")
    return root, model, two


def test_two_ranks_write_what_one_process_writes(runs):
    root, _, two = runs
    names = sorted(os.listdir(root / "single"))
    assert names == sorted(os.listdir(root / "two")) == [f"{i:06d}.png" for i in range(7)] + ["grid.png", "run.json"]
    assert np.array_equal(pixels(root / "two", range(7)), pixels(root / "single", range(7)))
    assert "wrote 7 images" in two.stdout and two.stdout.count("wrote") == 1  # rank 0 reports for the run
    manifest = json.loads((root / "two" / "run.json").read_text())
    extra = manifest["extra"]
    assert extra["world_size"] == 2 and extra["images_per_rank"] == [4, 3] and extra["images_per_second"] > 0
    assert extra["output"] == {"format": "png", "layout": "flat"}
    single = json.loads((root / "single" / "run.json").read_text())
    assert single["model_sha256"] == manifest["model_sha256"] and single["extra"]["world_size"] == 1
    assert not leftovers(root / "two")


def test_resume_after_deleting_images_rewrites_only_those(runs):
    root, model, _ = runs
    out = root / "two"
    expected = pixels(out, range(7))
    deleted = [1, 6]  # one of each rank's share
    for i in deleted:
        os.unlink(out / f"{i:06d}.png")
    before = {i: os.stat(out / f"{i:06d}.png") for i in range(7) if i not in deleted}
    rerun = fastdiff_command(["--model", model, "--out", str(out), *RUN], nproc=2)
    assert rerun.returncode == 0, run_report(rerun, out)
    assert "wrote 2 images" in rerun.stdout and "(5 already there)" in rerun.stdout
    for i, st in before.items():  # untouched: same file, same modification time
        now = os.stat(out / f"{i:06d}.png")
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), i
    assert np.array_equal(pixels(out, range(7)), expected)
    assert json.loads((out / "run.json").read_text())["extra"]["images_per_rank"] == [1, 1]


def test_a_failing_rank_fails_the_run_and_leaves_only_complete_images(runs):
    root, model, _ = runs
    out = root / "failing"
    (out / "000002.png").mkdir(parents=True)  # rank 1 cannot write image 2 (batch 1 is rank 1's)
    result = fastdiff_command(["--model", model, "--out", str(out), *RUN], nproc=2)
    assert result.returncode != 0
    assert "fastdiff: error: rank 1 failed while sampling: " in result.stderr
    assert "000002.png is a folder, not an image" in result.stderr
    images = [n for n in os.listdir(out) if n.endswith(".png") and n != "000002.png"]
    assert all(is_sample_png(str(out / n), (3, 8, 8)) for n in images)
    assert "grid.png" not in images and not leftovers(out)


@pytest.mark.slow
def test_npz_shards_round_trip_to_the_png_pixels(runs):
    root, model, _ = runs
    out = root / "npz"
    result = fastdiff_command(["--model", model, "--out", str(out), "--format", "npz", *RUN], nproc=2)
    assert result.returncode == 0, run_report(result, out)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".npz"))
    assert shards == ["samples_000000_2.npz", "samples_000002_2.npz", "samples_000004_2.npz", "samples_000006_1.npz"]
    with np.load(out / shards[1]) as shard:
        assert shard["arr_0"].dtype == np.uint8 and shard["arr_0"].shape == (2, 8, 8, 3)
        assert shard["indices"].tolist() == [2, 3]
    assert np.array_equal(pixels(out, range(7)), pixels(root / "single", range(7)))
    assert (out / "grid.png").exists() and not leftovers(out)


@pytest.mark.slow
def test_more_ranks_than_images(runs):
    root, model, _ = runs
    out = root / "one_image"
    result = fastdiff_command(["--model", model, "--out", str(out), "--num-images", "1", "--steps", "2",
                               "--device", "cpu", "--no-progress"], nproc=2)
    assert result.returncode == 0, run_report(result, out)
    assert sorted(os.listdir(out)) == ["000000.png", "grid.png", "run.json"]
    assert json.loads((out / "run.json").read_text())["extra"]["images_per_rank"] == [1, 0]


# ----------------------------------------------------------------------------------------------------
# In one process: layouts, formats, resume rules, the writer
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def sampler():
    from tiny_models import tiny_unet

    return Sampler(tiny_unet(), DDIMScheduler(num_train_timesteps=100), backend="reference")


def draw(sampler, out, **kwargs):
    settings = {"num_images": 5, "batch_size": 2, "seed": 3, "steps": 2, "progress": False, **kwargs}
    return generate(sampler, out_dir=str(out), **settings)


def test_subfolders_layout_and_resume(sampler, tmp_path):
    draw(sampler, tmp_path / "flat")
    result = draw(sampler, tmp_path / "sub", layout="subfolders")
    assert sorted(os.listdir(tmp_path / "sub")) == ["000000", "grid.png", "run.json"]
    assert sorted(os.listdir(tmp_path / "sub" / "000000")) == [f"{i:06d}.png" for i in range(5)]
    assert len(result.written) == 5
    assert np.array_equal(pixels(tmp_path / "sub", range(5)), pixels(tmp_path / "flat", range(5)))
    os.unlink(tmp_path / "sub" / "000000" / "000003.png")
    again = draw(sampler, tmp_path / "sub")  # auto: the stored layout wins over what auto would choose
    assert again.written == [str(tmp_path / "sub" / "000000" / "000003.png")] and again.skipped == 4
    with pytest.raises(RunMismatchError, match="holds a run in the subfolders layout"):
        draw(sampler, tmp_path / "sub", layout="flat")


def test_layout_auto_and_subfolder_names(tmp_path):
    assert output.resolve_layout("auto", 10_000) == "flat"
    assert output.resolve_layout("auto", 10_001) == "subfolders"
    store = output.ImageStore(str(tmp_path), (3, 8, 8), "png", "subfolders")
    assert store.png_path(12_345) == os.path.join(str(tmp_path), "012000", "012345.png")
    assert store.png_path(999) == os.path.join(str(tmp_path), "000000", "000999.png")


def test_format_is_part_of_the_run(sampler, tmp_path):
    draw(sampler, tmp_path / "png")
    draw(sampler, tmp_path, output_format="npz")
    assert np.array_equal(pixels(tmp_path, range(5)), pixels(tmp_path / "png", range(5)))
    with pytest.raises(RunMismatchError, match="written as --format npz"):
        draw(sampler, tmp_path)
    result = draw(sampler, tmp_path, overwrite=True)  # overwrite removes the shards first
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".npz")] and len(result.written) == 5
    assert RunManifest.read(str(tmp_path)).extra["output"] == {"format": "png", "layout": "flat"}


def test_broken_shard_is_drawn_again(sampler, tmp_path):
    draw(sampler, tmp_path, output_format="npz")
    expected = pixels(tmp_path, range(5))
    shard = tmp_path / "samples_000002_2.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated copy
    result = draw(sampler, tmp_path, output_format="npz")
    assert result.written == [str(shard)] and np.array_equal(pixels(tmp_path, range(5)), expected)


def test_subfolder_images_without_manifest_are_not_adopted(sampler, tmp_path):
    draw(sampler, tmp_path, layout="subfolders")
    os.unlink(tmp_path / "run.json")
    with pytest.raises(RunMismatchError, match="5 image files but no run manifest"):
        draw(sampler, tmp_path, layout="subfolders")


class _SlowStore:
    """A store whose writes wait for ``release`` (or raise ``fail``)."""

    def __init__(self, fail=None):
        self.release, self.fail, self.calls = threading.Event(), fail, []

    def write(self, indices, pictures, executor=None):
        self.release.wait(10)
        if self.fail:
            raise self.fail
        self.calls.append((list(indices), pictures.copy()))
        return [str(i) for i in indices]


def test_writer_is_bounded_and_keeps_order():
    store = _SlowStore()
    writer = output.BackgroundWriter(store, max_pending=1)
    batch = torch.rand(2, 3, 4, 4) * 2 - 1
    writer.submit(batch, [0, 1])  # taken by the thread, which waits
    time.sleep(0.2)
    writer.submit(batch, [2, 3])  # fills the queue
    third = threading.Thread(target=writer.submit, args=(batch, [4, 5]))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third batch must wait while the writer is max_pending behind"
    store.release.set()
    third.join(5)
    assert writer.close() == ["0", "1", "2", "3", "4", "5"]
    expected = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(p, expected) for _, p in store.calls)


def test_writer_errors_reach_the_caller():
    store = _SlowStore(fail=OSError(28, "cannot write out/000000.png: No space left on device"))
    store.release.set()
    writer = output.BackgroundWriter(store)
    writer.submit(torch.zeros(1, 3, 2, 2), [0])
    with pytest.raises(OSError, match="No space left on device"):
        writer.close()


def test_non_finite_batch_is_refused_by_the_writer(sampler, tmp_path):
    with torch.no_grad():
        sampler.model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"batch 1 of 3 \(images 0..1\) has NaN"):
        draw(sampler, tmp_path)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".png")] and not leftovers(tmp_path)


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 2), (3, 4), (4, 1), (8, 3)])
def test_every_index_has_exactly_one_rank(world_size, batch_size):
    owners = [[r for r in range(world_size) if Ranks(r, world_size).owns(i, batch_size)] for i in range(50)]
    assert all(len(o) == 1 for o in owners)
    shares = [len(Ranks(r, world_size).my_indices(range(50), batch_size)) for r in range(world_size)]
    assert max(shares) - min(shares) <= batch_size


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 does not fit WORLD_SIZE=2"),
    ({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "do not fit together"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "RANK or LOCAL_RANK is not"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
])
def test_inconsistent_launch_environment(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        from_environment()


@pytest.mark.parametrize("args,message", [
    (["--format", "jpg"], "argument --format: invalid choice: 'jpg'"),
    (["--layout", "deep"], "argument --layout: invalid choice: 'deep'"),
    pytest.param(["--device", "cuda"], "no CUDA GPU is available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_output_options_are_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(["sample", "--num-images", "2", "--out", str(out), *args])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("fastdiff: error:")
    assert not out.exists()


@pytest.mark.gpu
def test_writer_copies_cuda_batches_through_pinned_memory():
    """On CUDA the batch reaches the writer as pinned uint8 through a non-blocking copy; same pixels as the CPU."""
    store = _SlowStore()
    store.release.set()
    batch = torch.rand(3, 3, 16, 16, device="cuda") * 2 - 1
    with output.BackgroundWriter(store) as writer:
        for k in range(4):  # several batches in flight while the device keeps working
            writer.submit(batch * (1 - 0.1 * k), [3 * k, 3 * k + 1, 3 * k + 2])
    assert [i for indices, _ in store.calls for i in indices] == list(range(12))
    for k, (_, pictures) in enumerate(store.calls):
        expected = output.to_uint8_nhwc((batch * (1 - 0.1 * k)).cpu()).numpy()
        assert np.array_equal(pictures, expected), k


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_fails_every_rank_before_anything_is_written(runs):
    root, model, _ = runs
    out = root / "no_gpu"
    result = fastdiff_command(["--model", model, "--out", str(out), "--num-images", "4", "--steps", "2",
                               "--device", "cuda", "--no-progress"], nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastdiff: error:")]
    assert errors and all("no CUDA GPU is available here" in line for line in errors), result.stderr[-2000:]
    assert not out.exists()
