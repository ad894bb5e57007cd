"""The command line: sampling, shapes, info, and one-line errors for bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.checkpoint import save_checkpoint
from fastdiff.cli import main
from fastdiff.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = UNetConfig.classic(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                                image_channels=3, image_size=8, norm_num_groups=4)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    scheduler = {"num_train_timesteps": 100, "beta_schedule": "linear", "prediction_type": "epsilon"}
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, directory, extra_metadata={"scheduler": scheduler})
    return directory


def _pixels(folder, n):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))).astype(int) for i in range(n)])


@pytest.mark.parametrize("scheduler,extra", [("ddim", ["--eta", "0.5"]), ("ddpm", [])])
def test_same_images_whatever_the_batch_size(tmp_path, checkpoint, scheduler, extra):
    common = ["sample", "--model", str(checkpoint), "--scheduler", scheduler, "--steps", "6", "--num-images", "8",
              "--seed", "0", "--device", "cpu", "--no-progress", *extra]
    assert main(common + ["--batch-size", "8", "--out", str(tmp_path / "b8")]) == 0
    assert main(common + ["--batch-size", "3", "--out", str(tmp_path / "b3")]) == 0
    a, b = _pixels(tmp_path / "b8", 8), _pixels(tmp_path / "b3", 8)
    assert a.shape == (8, 8, 8, 3)
    assert np.abs(a - b).max() <= 1, "no pixel may differ by more than 1/255 between batch sizes"
    assert len({img.tobytes() for img in a}) == 8, "every image must differ"
    assert os.path.isfile(tmp_path / "b8" / "grid.png")


def test_seed_and_seed_plus_2_to_the_32_draw_different_images(tmp_path, checkpoint):
    """The base seed travels from the command line to every image without losing its high bits."""
    common = ["sample", "--model", str(checkpoint), "--steps", "2", "--num-images", "2", "--device", "cpu",
              "--no-progress", "--no-grid"]
    for name, seed in (("a", 5), ("b", 5 + 2**32), ("c", 2**64 - 1)):
        assert main(common + ["--seed", str(seed), "--out", str(tmp_path / name)]) == 0
    a, b, c = (_pixels(tmp_path / name, 2) for name in "abc")
    assert np.abs(a.astype(int) - b).max() > 8, "--seed 5 and --seed 5 + 2**32 drew the same images"
    assert np.abs(a.astype(int) - c).max() > 8


def test_init_image_sampling(tmp_path, checkpoint):
    Image.fromarray((np.random.rand(20, 30, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    rc = main(["sample", "--model", str(checkpoint), "--steps", "10", "--num-images", "2", "--device", "cpu",
               "--init-image", str(tmp_path / "in.png"), "--strength", "0.5", "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 0 and os.path.isfile(tmp_path / "o" / "000001.png")


def test_shapes_classic_512(capsys):
    assert main(["shapes", "--image-size", "512", "--n-channels", "128", "--ch-mults", "1,2,4"]) == 0
    out = capsys.readouterr().out
    assert "down" in out and "mid" in out and "up" in out
    assert "(1, 128, 512, 512)" in out and "(1, 512, 128, 128)" in out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "attention sdpa" in out


BAD_INPUTS = {
    "missing model": (["--model", "/nonexistent/model"], "no such file"),
    "negative steps": (["--steps", "-5"], "positive integer"),
    "zero batch": (["--batch-size", "0"], "positive integer"),
    "strength above 1": (["--strength", "1.5"], r"\[0, 1\]"),
    "strength below 0": (["--strength", "-0.1"], r"\[0, 1\]"),
    "cpu half precision": (["--dtype", "float16", "--device", "cpu"], "needs a GPU"),
    "negative seed": (["--seed", "-1"], r"seed.*\[0, 2\*\*64\)"),
    "seed of 2**64": (["--seed", str(2**64)], r"seed.*\[0, 2\*\*64\)"),
}


def run_cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors exit
        return exc.code


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_error(tmp_path, checkpoint, case, capsys):
    args, message = BAD_INPUTS[case]
    argv = ["sample", "--model", str(checkpoint), "--out", str(tmp_path / "o"), "--num-images", "2", *args]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdiff: error:"), err
    assert re.search(message, err[0]), err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_config_that_does_not_match_the_weights(tmp_path, checkpoint, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    doc = json.loads((checkpoint / "config.json").read_text())
    doc["config"]["block_out_channels"] = [16, 32]
    (broken / "config.json").write_text(json.dumps(doc))
    (broken / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    rc = main(["sample", "--model", str(broken), "--out", str(tmp_path / "o"), "--num-images", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "shape" in err[0]
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdiff.cli", "sample", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fastdiff: error:")
