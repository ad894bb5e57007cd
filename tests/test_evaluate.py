"""The digit classifier and the sample-quality metrics on cases with known answers."""

import json
import os

import pytest
import torch

pytest.importorskip("sklearn")

from fastdiff import evaluate as ev  # noqa: E402
from fastdiff.data import load_digits  # noqa: E402

SHIPPED_ACCURACY = 0.97  # the shipped classifier's held-out accuracy is 0.992 (digits_classifier.json)


@pytest.fixture(scope="module")
def held():
    return load_digits("heldout", ev.CLASSIFIER_SIZE)


def test_shipped_classifier_loads_and_is_accurate(held):
    meta_path = os.path.splitext(ev.CLASSIFIER_PATH)[0] + ".json"
    with open(meta_path) as f:
        meta = json.load(f)
    assert meta["feature_dim"] == ev.FEATURE_DIM and meta["input_size"] == ev.CLASSIFIER_SIZE
    clf = ev.load_classifier()
    acc = ev.accuracy(held.images, held.labels, clf)
    assert acc >= SHIPPED_ACCURACY, f"held-out accuracy {acc:.4f} < {SHIPPED_ACCURACY}"
    assert abs(acc - meta["heldout_accuracy"]) < 1e-3  # the weights are the ones the JSON describes


def test_frechet_distance_matches_scipy_on_random_gaussians():
    linalg = pytest.importorskip("scipy.linalg")
    a = torch.randn(300, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + torch.randn(6)
    b = torch.randn(200, 6, dtype=torch.float64) * 0.7 - 0.3
    mu_a, s_a = a.mean(0).numpy(), torch.cov(a.T).numpy()
    mu_b, s_b = b.mean(0).numpy(), torch.cov(b.T).numpy()
    ref = ((mu_a - mu_b) ** 2).sum() + (s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real).trace()
    assert ev.frechet_distance(a, b) == pytest.approx(float(ref), rel=1e-8)
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    a = torch.randn(500, 4, dtype=torch.float64)
    shift = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    assert ev.frechet_distance(a + shift, a) == pytest.approx(shift.square().sum().item(), rel=1e-9)


def test_kernel_distance_matches_its_definition():
    a, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) + 0.5
    k = lambda x, y: (float(x @ y) / 3 + 1) ** 3  # noqa: E731
    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    ab = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert ev.kernel_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-10)
    assert ev.kernel_distance(2 * a, 2 * b, scale=2.0) == pytest.approx(aa + bb - 2 * ab, rel=1e-10)
    # unbiased: two samples of one distribution give about zero, a shifted one does not
    x, y = torch.randn(800, 4, dtype=torch.float64), torch.randn(800, 4, dtype=torch.float64)
    assert abs(ev.kernel_distance(x, y)) < 0.1 * ev.kernel_distance(x, y + 1.0)


def test_real_digits_score_well_and_real_vs_real_is_near_zero(held):
    m = ev.evaluate_images(held.images)
    assert m["num_images"] == len(held.images)
    assert m["confident_share"] > 0.9
    assert m["class_entropy"] > 0.99 and m["max_class_share"] < 0.12 and m["min_class_share"] > 0.08
    assert m["fd"] == pytest.approx(0.0, abs=1e-6)  # held-out against itself
    # a real set the metric has not been compared with: the training digits
    train = load_digits("train", ev.CLASSIFIER_SIZE).images
    gen = torch.Generator().manual_seed(1)
    subset = train[torch.randperm(len(train), generator=gen)[:300]]
    real = ev.evaluate_images(subset, seed=1)
    noise = ev.evaluate_images(torch.rand(300, 1, 16, 16) * 2 - 1, seed=1)
    assert real["fd"] < 0.05 * noise["fd"], (real["fd"], noise["fd"])
    assert real["fd_real"] < 0.05 * noise["fd"]
    assert noise["fd"] > 10 * noise["fd_real"]
    assert abs(real["kid"]) < 0.1 * noise["kid"] and abs(real["kid_real"]) < 0.1 * noise["kid"]
    assert noise["confident_share"] < 0.5 < real["confident_share"]


def test_single_class_batch_has_zero_entropy(held):
    ones = held.images[held.labels == 1]
    m = ev.evaluate_images(ones)
    assert m["class_entropy"] < 0.1 and m["max_class_share"] > 0.95
    assert m["class_counts"][1] == max(m["class_counts"])
    assert m["fd"] > ev.evaluate_images(held.images[:len(ones) * 5])["fd"]  # one class is far from all digits


def test_prepare_images_accepts_other_sizes_and_rgb(held):
    x = held.images[:20]
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    rgb = big.expand(-1, 3, -1, -1)
    p_small, _ = ev.classify(x)
    p_rgb, _ = ev.classify(rgb)
    assert (p_small.argmax(1) == p_rgb.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("bad", [torch.zeros(0, 1, 16, 16), torch.zeros(16, 16), "images"])
def test_bad_input(bad):
    with pytest.raises(ValueError):
        ev.evaluate_images(bad)


def test_eval_cli_on_a_folder(tmp_path, held, capsys):
    from fastdiff.images import save_images

    save_images(held.images[:40], str(tmp_path), range(40))
    out = tmp_path / "metrics.json"
    assert ev.main(["--images", str(tmp_path), "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 40 and m["confident_share"] > 0.9
    assert "Frechet distance" in capsys.readouterr().out
    with pytest.raises(ValueError):
        ev.main(["--num-images", "0"])


def test_shipped_default_model_draws_digits():
    """The embedded model and its stored schedule: 32 images, 10 DDIM steps, mostly confident digits, many classes."""
    from fastdiff.pipeline import build_sampler, default_model_dir

    with open(os.path.join(default_model_dir(), "config.json")) as f:
        stored = json.load(f)["scheduler"]
    assert stored["num_train_timesteps"] == 1000 and stored["prediction_type"] == "epsilon"
    sampler, _ = build_sampler(None, "ddim")
    images = ev.sample_images(sampler, 32, steps=10, seed=0, progress=False)
    assert images.shape == (32, 1, 16, 16) and torch.isfinite(images).all()
    m = ev.evaluate_images(images)
    assert m["confident_share"] >= 0.6, m
    assert sum(c > 0 for c in m["class_counts"]) >= 7, m["class_counts"]


def test_train_classifier_writes_to_a_user_path_not_the_package(tmp_path, monkeypatch, capsys):
    shipped = open(ev.CLASSIFIER_PATH, "rb").read()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    quick = ev.DigitClassifier().eval()  # the 30-epoch training is not what this test is about
    monkeypatch.setattr(ev, "train_classifier", lambda: quick)
    assert ev.main(["--train-classifier"]) == 0
    written = tmp_path / "digits_classifier.safetensors"
    assert written.is_file() and (tmp_path / "digits_classifier.json").is_file()
    assert f"written to {ev.USER_CLASSIFIER_NAME}" in capsys.readouterr().out
    assert open(ev.CLASSIFIER_PATH, "rb").read() == shipped
    loaded = ev.load_classifier(str(written))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), quick.state_dict().values()))
    with pytest.raises(ValueError, match="does not exist"):
        ev.main(["--train-classifier", "--classifier-out", str(tmp_path / "missing" / "c.safetensors")])


def test_eval_json_to_a_folder_is_refused_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_classifier", lambda *a: pytest.fail("evaluated before checking --json"))
    with pytest.raises(ValueError, match="is a folder"):
        ev.main(["--images", str(tmp_path), "--json", str(tmp_path)])
