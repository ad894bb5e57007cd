"""The run manifest: a rerun with the same settings resumes, any other settings stop before sampling."""

import json
import os
import re

import pytest
import torch

from fastdiff.cli import main
from fastdiff.manifest import MANIFEST_NAME, RunManifest, RunMismatchError, model_sha256
from tiny_models import save_tiny_checkpoint, tiny_unet


def _manifest(**changes):
    base = dict(model_sha256="a" * 64, scheduler={"_class_name": "DDIMScheduler", "beta_end": 0.02}, steps=10,
                eta=0.0, seed=0, image_shape=(3, 8, 8), dtype="float32", model="somewhere", num_images=4)
    base.update(changes)
    return RunManifest(**base)


def test_round_trip_and_format(tmp_path):
    m = _manifest(extra={"world_size": 2})
    m.write(tmp_path)
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert doc["fastdiff_run"] == 1 and doc["image_shape"] == [3, 8, 8] and doc["fastdiff_version"]
    assert RunManifest.read(tmp_path) == m
    assert RunManifest.read(tmp_path / "absent") is None


def test_differences_name_every_field():
    a = _manifest()
    assert a.differences(_manifest()) == []
    b = _manifest(steps=20, seed=7, image_shape=(1, 16, 16), scheduler={"_class_name": "DDPMScheduler",
                                                                            "beta_end": 0.03})
    diffs = a.differences(b)
    assert "steps 10 -> 20" in diffs and "seed 0 -> 7" in diffs and "image_shape 3x8x8 -> 1x16x16" in diffs
    assert "scheduler _class_name 'DDIMScheduler' -> 'DDPMScheduler'" in diffs
    assert "scheduler beta_end 0.02 -> 0.03" in diffs
    assert a.differences(_manifest(model_sha256="b" * 64)) == ["model aaaaaaaaaaaa -> bbbbbbbbbbbb"]
    # recorded-only fields never stop a resume
    assert a.differences(_manifest(num_images=100, model="elsewhere", device="cuda:0", backend="triton",
                                   extra={"images_per_second": 3.0})) == []


def test_check_or_write(tmp_path):
    assert _manifest().check_or_write(tmp_path) == "new"
    (tmp_path / "000000.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    assert _manifest(num_images=8, extra={"world_size": 2}).check_or_write(tmp_path) == "resume"
    stored = RunManifest.read(tmp_path)
    assert stored.num_images == 8 and stored.extra == {"world_size": 2}
    with pytest.raises(RunMismatchError, match=r"eta 0\.0 -> 0\.5"):
        _manifest(eta=0.5).check_or_write(tmp_path)
    assert RunManifest.read(tmp_path).eta == 0.0, "a refused run must leave the manifest alone"
    assert _manifest(eta=0.5).check_or_write(tmp_path, overwrite=True) == "overwritten"
    assert not (tmp_path / "000000.png").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert RunManifest.read(tmp_path).eta == 0.5
    m = RunManifest.read(tmp_path)
    m.record(tmp_path, images_per_second=12.5)
    assert RunManifest.read(tmp_path).extra["images_per_second"] == 12.5


def test_images_without_a_manifest_are_not_adopted(tmp_path):
    (tmp_path / "000003.png").write_bytes(b"x")
    with pytest.raises(RunMismatchError, match="1 images but no run manifest"):
        _manifest().check_or_write(tmp_path)
    assert _manifest().check_or_write(tmp_path, overwrite=True) == "overwritten"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"fastdiff_run": 1, "steps": 3}), "[]"])
def test_garbage_manifest_is_named(tmp_path, content):
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(RunMismatchError, match=re.escape(str(tmp_path / MANIFEST_NAME))):
        _manifest().check_or_write(tmp_path)


def test_model_hash_sees_every_weight():
    a, b = tiny_unet(0), tiny_unet(0)
    assert model_sha256(a) == model_sha256(b)
    with torch.no_grad():
        next(iter(b.parameters())).view(-1)[0] += 1e-6
    assert model_sha256(a) != model_sha256(b)
    assert model_sha256(a) != model_sha256(a.to(torch.float64))
    # every dtype a sampler holds (bfloat16 has no numpy type), 0-dim buffers, non-contiguous views
    from fastdiff.manifest import tensor_sha256

    x = torch.randn(4, 3)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        assert tensor_sha256({"x": x.to(dtype)}) == tensor_sha256({"x": x.to(dtype).clone()})
    assert tensor_sha256({"x": x.t()}) == tensor_sha256({"x": x.t().contiguous()}) != tensor_sha256({"x": x})
    assert tensor_sha256({"s": torch.tensor(2.0)}) != tensor_sha256({"s": torch.tensor(3.0)})
    assert tensor_sha256({"a": x}) != tensor_sha256({"b": x}), "names are part of the hash"


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_checkpoint(root / "a", seed=0), save_tiny_checkpoint(root / "b", seed=1)


def _sample(model, out, *extra):
    return main(["sample", "--model", str(model), "--out", str(out), "--steps", "3", "--num-images", "3",
                 "--batch-size", "2", "--device", "cpu", "--no-progress", *extra])


def _snapshot(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


CHANGES = {
    "other model": (["--model", "B"], r"model [0-9a-f]{12} -> [0-9a-f]{12}"),
    "seed": (["--seed", "5"], r"seed 0 -> 5"),
    "steps": (["--steps", "4"], r"steps 3 -> 4"),
    "scheduler": (["--scheduler", "ddpm"], r"scheduler _class_name 'DDIMScheduler' -> 'DDPMScheduler'"),
    "eta": (["--eta", "0.5"], r"eta 0\.0 -> 0\.5"),
    "image size": (["--image-size", "16"], r"image_shape 3x8x8 -> 3x16x16"),
}


@pytest.mark.parametrize("case", CHANGES)
def test_cli_refuses_a_different_run_before_sampling(tmp_path, models, case, capsys, monkeypatch):
    out = tmp_path / "mix"
    assert _sample(models[0], out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    args, message = CHANGES[case]
    model = models[1] if args[:2] == ["--model", "B"] else models[0]
    args = args[2:] if args[:2] == ["--model", "B"] else args

    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the manifest")

    monkeypatch.setattr("fastdiff.sampling.Sampler.sample", no_sampling)
    assert _sample(model, out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastdiff: error:") and re.search(message, err) and "--overwrite" in err, err
    assert _snapshot(out) == before, "a refused run must not touch the folder"


def test_cli_same_settings_resume_and_overwrite_replaces(tmp_path, models, capsys):
    out = tmp_path / "run"
    assert _sample(models[0], out) == 0
    first = _snapshot(out)
    os.unlink(out / "000001.png")
    capsys.readouterr()
    assert _sample(models[0], out) == 0
    assert "wrote 1 images" in capsys.readouterr().out and _snapshot(out) == first
    # another model and fewer images with --overwrite: every old image is gone, the new run is complete
    assert main(["sample", "--model", str(models[1]), "--out", str(out), "--steps", "3", "--num-images", "2",
                 "--device", "cpu", "--no-progress", "--overwrite"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["000000.png", "000001.png", "grid.png", MANIFEST_NAME]
    assert (out / "000000.png").read_bytes() != first["000000.png"]
    assert RunManifest.read(out).model == str(models[1])
