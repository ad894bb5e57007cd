"""Output a user can trust: the files fastdiff writes, and one-line errors for ordinary filesystem conditions.

Every CLI test runs in a fresh temporary folder (``monkeypatch.chdir``), as a new user would.
"""

import errno
import logging
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import fileio
from fastdiff.cli import main
from fastdiff.manifest import MANIFEST_NAME
from tiny_models import save_tiny_checkpoint, tiny_unet


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh, empty working folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's errors exit
        return exc.code


def sample(model, out, *extra):
    return run_cli(["sample", "--model", str(model), "--out", str(out), "--steps", "2", "--num-images", "3",
                    "--batch-size", "2", "--device", "cpu", "--no-progress", *extra])


def one_error_line(capsys) -> str:
    """The error: one line, the last on stderr (after the run's description, if it got that far), no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("fastdiff: error: "), err
    return errors[0]


def forbid_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the problem was reported")

    monkeypatch.setattr("fastdiff.sampling.Sampler.sample", refuse)


# ------------------------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_file_follows_the_umask(fresh, model, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        assert sample(model, "out") == 0
        fileio.atomic_write_text(fresh / "report.json", "{}")
        from fastdiff.checkpoint import save_checkpoint

        save_checkpoint(tiny_unet(), fresh / "ckpt")  # safetensors writes its files 0600 on its own
        temp_dir = fileio.make_temp_dir(str(fresh), ".tmp-step_000001-")
    finally:
        os.umask(old)
    files = [fresh / "out" / n for n in os.listdir(fresh / "out")] + [fresh / "report.json"]
    files += [fresh / "ckpt" / n for n in os.listdir(fresh / "ckpt")]
    assert len(files) == 3 + 2 + 1 + 2  # 3 images, grid, manifest, report, config + weights
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == file_mode, (path, oct(os.stat(path).st_mode))
    for path in (fresh / "out", temp_dir):
        assert stat.S_IMODE(os.stat(path).st_mode) == dir_mode, (path, oct(os.stat(path).st_mode))


# ------------------------------------------------------------------------------------------- leftovers


def test_stale_temporaries_of_our_naming_are_removed(fresh, model):
    (fresh / "out").mkdir()
    ours = [".000001.png.ab_cd123.tmp", ".grid.png.zz9zz9zz.tmp", f".{MANIFEST_NAME}.k2j3h4g5.tmp"]
    others = [".notes.txt.abcd1234.tmp", "mine.tmp", ".000001.png.tmp", "keep.png.abcd1234.tmp"]
    for name in ours + others:
        (fresh / "out" / name).write_bytes(b"partial")
    assert sample(model, "out") == 0
    left = set(os.listdir(fresh / "out"))
    assert not left & set(ours) and set(others) <= left


def test_unreadable_existing_image_is_drawn_again(fresh, model, capsys, caplog):
    assert sample(model, "a") == 0
    good = (fresh / "a" / "000001.png").read_bytes()
    (fresh / "a" / "000001.png").write_bytes(b"not a png at all")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert sample(model, "a") == 0
    assert "1 unreadable images drawn again" in capsys.readouterr().out
    assert any("000001.png" in r.getMessage() and "drawing it again" in r.getMessage() for r in caplog.records)
    assert (fresh / "a" / "000001.png").read_bytes() == good
    Image.open(fresh / "a" / "grid.png").load()


def test_a_folder_named_like_an_image_is_reported(fresh, model, capsys):
    assert sample(model, "a", "--num-images", "1") == 0
    (fresh / "a" / "000002.png").mkdir()
    capsys.readouterr()
    assert sample(model, "a") == 2
    line = one_error_line(capsys)
    assert "000002.png is a folder" in line
    assert (fresh / "a" / "000002.png").is_dir(), "a user's folder is never deleted"


def test_disk_full_is_one_line_and_leaves_whole_files(fresh, model, capsys, monkeypatch):
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > 2:  # the third image: the disk is full after a few bytes
            with open(fp, "wb") as f:
                f.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    assert sample(model, "full") == 2
    line = one_error_line(capsys)
    assert re.search(r"cannot write \S*full/000002\.png: No space left on device", line), line
    names = sorted(os.listdir(fresh / "full"))
    assert names == ["000000.png", "000001.png", MANIFEST_NAME], names  # no temporary file, no partial image
    for name in names[:2]:
        Image.open(fresh / "full" / name).load()


# ------------------------------------------------------------------------------------------- bad --out


@pytest.mark.parametrize("out, message", [
    ("afile", r"--out afile exists and is not a folder"),
    ("/dev/null", r"--out /dev/null exists and is not a folder"),
    ("/proc/x", r"--out /proc/x: cannot create the folder"),
    ("", r"--out is empty"),
    ("afile/sub", r"--out afile/sub: cannot create the folder"),
])
def test_unusable_out_is_reported_before_any_work(fresh, model, out, message, capsys, monkeypatch):
    (fresh / "afile").write_text("precious")
    forbid_sampling(monkeypatch)
    monkeypatch.setattr("fastdiff.pipeline.build_sampler", lambda *a, **k: pytest.fail("model loaded"))
    assert sample(model, out) == 2
    assert re.search(message, one_error_line(capsys))
    assert (fresh / "afile").read_text() == "precious"


def test_read_only_out_is_named_before_sampling(fresh, model, capsys, monkeypatch):
    (fresh / "ro").mkdir()
    real_mkstemp = fileio.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # what a read-only folder does (root ignores chmod, so simulate)
        if os.path.abspath(dir) == str(fresh / "ro"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    forbid_sampling(monkeypatch)
    assert sample(model, "ro") == 2
    assert one_error_line(capsys) == "fastdiff: error: --out ro is not writable (Permission denied)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the simulated test covers it")
def test_read_only_out_for_real(fresh, model, capsys, monkeypatch):
    (fresh / "ro").mkdir()
    os.chmod(fresh / "ro", 0o555)
    forbid_sampling(monkeypatch)
    assert sample(model, "ro") == 2
    assert "--out ro is not writable" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------- non-finite output


def test_non_finite_weights_stop_with_nothing_written(fresh, capsys):
    broken = tiny_unet()
    with torch.no_grad():
        broken.conv_out.weight.view(-1)[0] = float("nan")
    path = save_tiny_checkpoint(fresh / "nan", model=broken)
    assert sample(path, "out") == 2
    line = one_error_line(capsys)
    assert "batch 1 of 2 (images 0..1)" in line and "NaN or infinite" in line, line
    assert not [n for n in os.listdir(fresh / "out") if n.endswith(".png")]


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops that read a device value on the host."""

    HOST_READS = ("_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_non_finite_check_names_the_first_bad_batch_and_reads_the_host_once_per_batch(tmp_path, monkeypatch):
    from fastdiff.sampling import NonFiniteOutputError, Sampler, generate
    from fastdiff.schedulers import DDIMScheduler

    sampler = Sampler(tiny_unet(), DDIMScheduler(num_train_timesteps=100), backend="reference")
    real = Sampler.sample
    calls = []

    def sample_with_reads(self, seeds, **kwargs):
        with _HostReads() as reads:
            out = real(self, seeds, **kwargs)
        calls.append(reads.count)
        return out

    monkeypatch.setattr(Sampler, "sample", sample_with_reads)
    with _HostReads() as total:
        generate(sampler, num_images=6, batch_size=2, seed=0, steps=4, out_dir=str(tmp_path / "ok"), progress=False)
    # 3 batches x 4 steps: generate adds exactly one host read per batch (the finite check), none per step
    assert total.count - sum(calls) == 3, (total.count, calls)

    def poisoned(self, seeds, **kwargs):
        out = real(self, seeds, **kwargs)
        if int(seeds.numel()) == 2 and len(calls) == 4:  # the second batch of the next run
            out[1, 0, 0, 0] = float("inf")
        calls.append(0)
        return out

    monkeypatch.setattr(Sampler, "sample", poisoned)
    with pytest.raises(NonFiniteOutputError, match=r"batch 2 of 3 \(images 2\.\.3\).* 1 images, first image 3"):
        generate(sampler, num_images=6, batch_size=2, seed=0, steps=4, out_dir=str(tmp_path / "bad"), progress=False)
    assert sorted(n for n in os.listdir(tmp_path / "bad") if n.endswith(".png")) == ["000000.png", "000001.png"]


# ------------------------------------------------------------------------------------------- surprising options


def test_strength_without_init_image(fresh, model, capsys):
    assert sample(model, "o", "--strength", "0.3") == 2
    assert "--strength applies to image-to-image only" in one_error_line(capsys)


def test_init_image_of_another_shape_is_announced(fresh, model, caplog):
    Image.fromarray((np.random.rand(20, 30) * 255).astype(np.uint8), mode="L").save(fresh / "wide.png")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert sample(model, "o", "--init-image", "wide.png", "--strength", "0.5") == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "30x20, stretched to the model's 8x8" in messages and "1 channels, converted to the model's 3" in messages


def test_init_image_of_the_model_shape_is_silent(fresh, model, caplog):
    Image.fromarray((np.random.rand(16, 16, 3) * 255).astype(np.uint8)).save(fresh / "sq.png")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert sample(model, "o", "--init-image", "sq.png") == 0
    assert not [r for r in caplog.records if r.name.startswith("fastdiff.images")]


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1e3"])
def test_seed_out_of_range(fresh, model, seed, capsys):
    assert sample(model, "o", "--seed", seed) == 2
    assert "--seed" in one_error_line(capsys)


def test_largest_seed_is_accepted(fresh, model):
    assert sample(model, "o", "--seed", str(2**64 - 1), "--num-images", "1") == 0


def test_large_image_size_warns_with_an_estimate(fresh, model, capsys):
    assert sample(model, "o", "--image-size", "64", "--num-images", "1", "--steps", "1") == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: 64x64 is 64 times the pixels of the model's 8x8 training size: [\d.]+ GFLOP per "
                     r"image and step", err), err


def test_shapes_model_with_image_size(fresh, model, capsys):
    assert run_cli(["shapes", "--model", str(model), "--image-size", "64"]) == 0
    assert "(1, 3, 64, 64)" in capsys.readouterr().out
    assert run_cli(["shapes", "--model", str(model), "--n-channels", "16"]) == 2
    assert "--n-channels cannot be combined with --model" in one_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["shapes", "--ch-mults", "-1,2"], r"--ch-mults: expected comma-separated positive integers, got '-1,2'"),
    (["shapes", "--ch-mults", "0"], r"--ch-mults: expected comma-separated positive integers"),
    (["train", "--ch-mults", "-1,2"], r"--ch-mults: expected comma-separated positive integers, got '-1,2'"),
    (["kernels", "--target", ""], r"--target '' names no target"),
    (["kernels", "--json", "."], r"--json \. is a folder"),
    (["eval", "--json", "."], r"--json \. is a folder"),
    (["train", "--bogus"], r"unrecognized arguments: --bogus"),
    (["eval", "--bogus"], r"unrecognized arguments: --bogus"),
    (["kernels", "--bogus"], r"unrecognized arguments: --bogus"),
    (["-v", "sample", "--model", "/nonexistent"], r"no such file"),
])
def test_one_line_errors_everywhere(fresh, argv, message, capsys, monkeypatch):
    monkeypatch.setattr("fastdiff.kernels.compile_check.main", lambda argv: pytest.fail("compiled anyway"))
    monkeypatch.setattr("fastdiff.evaluate.load_classifier", lambda *a: pytest.fail("evaluated anyway"))
    assert run_cli(argv) == 2
    line = one_error_line(capsys)
    assert re.search(message, line), line


def test_traceback_on_request(fresh):
    from fastdiff.cli import UsageError

    with pytest.raises(UsageError):
        main(["--traceback", "sample", "--model", "/nonexistent"])


def test_verbose_is_scoped_to_fastdiff(fresh, capsys):
    root_level = logging.getLogger().level
    try:
        assert main(["-v", "info"]) == 0
        assert logging.getLogger("fastdiff.sampling").getEffectiveLevel() == logging.DEBUG
        for library in ("PIL", "urllib3", "torch", "triton"):
            assert logging.getLogger(library).getEffectiveLevel() >= logging.WARNING, library
    finally:
        logging.getLogger("fastdiff").setLevel(logging.NOTSET)
        logging.getLogger().setLevel(root_level)


def test_version_and_help_with_defaults(fresh, capsys):
    from fastdiff import __version__

    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastdiff {__version__}"
    assert run_cli(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("images to draw (default: 64)", "(default: ddim)", "(default: samples)", "(default: float32)"):
        assert shown in text, shown
    assert run_cli(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "total optimiser steps (default: 4000)" in text and "(default: runs/digits)" in text


def test_no_arguments_prints_help_in_a_fresh_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-m", "fastdiff.cli"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fastdiff") and "sample" in proc.stdout
    assert os.listdir(tmp_path) == [], "no sampling into ./samples"


def test_info_gives_one_reason_for_xformers(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # as on a machine without it: importing raises ImportError
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    version = next(line for line in lines if line.startswith("xformers "))
    attention = next(line for line in lines if line.strip().startswith("attention xformers"))
    assert "not available (ModuleNotFoundError)" in version, version
    assert "not available (ModuleNotFoundError)" in attention and "needs CUDA" not in attention, attention


def test_bench_results_default_to_the_current_folder(fresh):
    from fastdiff.bench_cli import with_default_out

    argv = with_default_out(["--device", "cpu", "--quick"])
    assert argv[:3] == ["--device", "cpu", "--quick"] and argv[3] == "--out"
    assert re.fullmatch(re.escape(str(fresh)) + r"/bench-results/cpu-\d{4}-\d\d-\d\d", argv[4]), argv
    assert with_default_out(["--out", "x"]) == ["--out", "x"]
    assert with_default_out(["--help"]) == ["--help"]


def test_generate_checks_the_init_image_before_any_work(tmp_path):
    from fastdiff.sampling import Sampler, generate
    from fastdiff.schedulers import DDIMScheduler

    sampler = Sampler(tiny_unet(), DDIMScheduler(num_train_timesteps=100), backend="reference")
    for init in (torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8, 16), torch.zeros(8, 8)):
        with pytest.raises(ValueError, match=r"init image has shape .*; the model samples \[N, 3, 8, 8\]"):
            generate(sampler, num_images=1, batch_size=1, seed=0, steps=2, out_dir=str(tmp_path / "o"), init=init,
                     strength=0.5, progress=False)
    assert not (tmp_path / "o").exists()
    result = generate(sampler, num_images=1, batch_size=1, seed=0, steps=2, out_dir=str(tmp_path / "o"),
                      init=torch.zeros(3, 8, 8), strength=0.5, progress=False)  # [C, H, W] is one image
    assert len(result.written) == 1


def test_kernels_passes_its_checked_options_on(fresh, monkeypatch):
    seen = []
    monkeypatch.setattr("fastdiff.kernels.compile_check.main", lambda argv: seen.append(argv) or 0)
    assert main(["kernels", "--target", " sm_90, ,sm_80 ", "--json", "rows.json"]) == 0
    assert seen == [["--target", "sm_90,sm_80", "--json", "rows.json"]]
