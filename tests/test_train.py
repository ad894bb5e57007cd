"""Training: the loss goes down on a tiny run, and a resumed run ends bit-identical to an uninterrupted one."""

import json
import os

import pytest
import torch

pytest.importorskip("sklearn")

from fastdiff.checkpoint import load_checkpoint  # noqa: E402
from fastdiff.train import (TrainConfig, config_from_args, build_parser, latest_checkpoint,  # noqa: E402
                            loss_on_batch, make_scheduler, train, training_target)
from fastdiff.unet import UNet  # noqa: E402


def tiny(out, **kw):
    """A ~10k-parameter UNet on 8x8 digits: a few steps take a fraction of a second each."""
    base = dict(data="digits", out=str(out), image_size=8, n_channels=8, ch_mults=(1, 2), is_attn=(False, True),
                n_blocks=1, norm_groups=4, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_every=10, log_every=5,
                progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _fixed_batch(config, n=64):
    """One fixed evaluation batch (x0, t, noise), independent of the training stream."""
    from fastdiff.data import load_digits

    gen = torch.Generator().manual_seed(1234)
    x0 = load_digits("train", config.image_size).images[torch.randperm(1438, generator=gen)[:n]]
    t = torch.linspace(50, 950, n).long()
    return x0, t, torch.randn(x0.shape, generator=gen)


def _state(path):
    return load_checkpoint(path).state_dict()


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down(tmp_path):
    cfg = tiny(tmp_path / "run", steps=40, checkpoint_every=40)
    scheduler = make_scheduler(cfg)
    x0, t, noise = _fixed_batch(cfg)
    torch.manual_seed(cfg.seed)  # train() draws its initial weights right after this seed
    initial = UNet(cfg.unet_config(1)).eval()
    with torch.no_grad():
        before = loss_on_batch(initial, scheduler, x0, t, noise, cfg.prediction_type).item()
    train(cfg)
    trained = load_checkpoint(os.path.join(cfg.out, "checkpoints", "step_000040", "model")).eval()
    with torch.no_grad():
        after = loss_on_batch(trained, scheduler, x0, t, noise, cfg.prediction_type).item()
    assert after < 0.6 * before, (before, after)
    # the training log agrees: the last third of the run has a lower loss than the first third
    with open(os.path.join(latest_checkpoint(cfg.out), "training_state.json")) as f:
        history = [loss for _, loss in json.load(f)["loss_history"]]
    third = len(history) // 3
    assert sum(history[-third:]) / third < 0.8 * sum(history[:third]) / third


def test_resume_is_bit_exact(tmp_path):
    kw = dict(steps=12, checkpoint_every=4, dropout=0.1)  # dropout: the global RNG state must resume too
    whole = train(tiny(tmp_path / "whole", **kw))
    train(tiny(tmp_path / "split", **kw), stop_at=6)  # "interrupted" after step 6
    assert os.path.basename(latest_checkpoint(str(tmp_path / "split"))) == "step_000006"
    assert not os.path.exists(tmp_path / "split" / "model")  # no final model before the last step
    resumed = train(tiny(tmp_path / "split", resume=True, **kw))
    assert _equal(_state(whole), _state(resumed))  # the final EMA weights
    for sub in ("model", "ema"):
        a = _state(tmp_path / "whole" / "checkpoints" / "step_000012" / sub)
        b = _state(tmp_path / "split" / "checkpoints" / "step_000012" / sub)
        assert _equal(a, b), sub
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "checkpoints" / "step_000012" / "training_state.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_000012" / "training_state.safetensors")
    assert _equal(a, b)  # optimizer moments and RNG states
    # the raw weights moved away from the EMA weights, so the test compares something that changes
    assert not _equal(_state(tmp_path / "whole" / "checkpoints" / "step_000012" / "model"), _state(whole))


def test_checkpoints_are_complete_pruned_and_carry_the_scheduler(tmp_path):
    cfg = tiny(tmp_path / "run", steps=6, checkpoint_every=2, keep_checkpoints=2, prediction_type="v_prediction",
               beta_schedule="squaredcos_cap_v2")
    final = train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_000004", "step_000006"]  # no temporaries left
    assert (root / "latest").read_text().strip() == "step_000006"
    with open(os.path.join(final, "config.json")) as f:
        doc = json.load(f)
    assert doc["scheduler"] == cfg.scheduler_config()
    assert doc["scheduler"]["prediction_type"] == "v_prediction"
    from fastdiff.pipeline import make_scheduler_for, scheduler_config_for

    sched = make_scheduler_for("ddim", scheduler_config_for(final))
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_schedule == "squaredcos_cap_v2"


def test_resume_refuses_a_different_model_or_nothing_to_resume(tmp_path):
    train(tiny(tmp_path / "run", steps=2))
    with pytest.raises(ValueError, match="n_channels"):
        train(tiny(tmp_path / "run", steps=4, n_channels=16, resume=True))
    with pytest.raises(FileNotFoundError):
        train(tiny(tmp_path / "empty", steps=4, resume=True))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_the_ddpm_objective_written_out(prediction_type):
    """loss_on_batch (what train() minimises) equals the DDPM objective computed here from scratch (Ho et al., 2020,
    eq. 14; v: Salimans & Ho, 2022): mean ||target - model(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 with
    abar_t from the linear betas in float64, on the same draws. A model that never sees t would differ."""
    cfg = tiny("unused", prediction_type=prediction_type)
    torch.manual_seed(5)
    model = UNet(cfg.unet_config(1)).eval()
    with torch.no_grad():  # random weights everywhere (the zero-initialised output layer included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.randint(0, cfg.num_train_timesteps, (8,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)

    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    target = {"epsilon": eps, "sample": x0,
              "v_prediction": (abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double()).float()}[prediction_type]
    with torch.no_grad():
        expected = (target - model(x_t, t)).pow(2).mean().item()
        got = loss_on_batch(model, make_scheduler(cfg), x0, t, eps, prediction_type).item()
        blind = (target - model(x_t, t * 0)).pow(2).mean().item()
    assert abs(blind - expected) > 1e-3 * expected, "the model must depend on t for this test to see it"
    assert got == pytest.approx(expected, rel=1e-5), (got, expected)


def test_training_targets_invert():
    x0, eps = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    abar = torch.rand(5, dtype=torch.float64) * 0.98 + 0.01
    a = abar.reshape(-1, 1, 1, 1).float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = training_target("v_prediction", x0, eps, abar.float())
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    assert training_target("epsilon", x0, eps, abar) is eps and training_target("sample", x0, eps, abar) is x0


def test_folder_training(tmp_path):
    from fastdiff.images import save_images

    save_images(torch.rand(6, 3, 8, 8) * 2 - 1, str(tmp_path / "imgs"), range(6))
    final = train(tiny(tmp_path / "run", data=str(tmp_path / "imgs"), steps=2, hflip=True))
    model = load_checkpoint(final)
    assert model.config.in_channels == 3 and model.config.sample_size == 8


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps"),
    (["--ch-mults", "1,2", "--is-attn", "0,0,1"], "is_attn"),
    (["--image-size", "18", "--ch-mults", "1,2,2"], "multiple"),
    (["--ema-decay", "1.5"], "ema_decay"),
])
def test_bad_configs(argv, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(build_parser().parse_args(argv)).validate()


def test_cli_defaults_match_the_dataclass():
    cfg = config_from_args(build_parser().parse_args([]))
    assert cfg == TrainConfig()


# ------------------------------------------------------------------------------- the CLI on existing runs
TINY_CLI = ["--data", "digits", "--image-size", "8", "--n-channels", "8", "--ch-mults", "1,2", "--is-attn", "0,1",
            "--norm-groups", "4", "--batch-size", "8", "--warmup-steps", "1", "--checkpoint-every", "2",
            "--no-progress", "--seed", "3"]


def _cli(argv) -> int:
    from fastdiff.cli import main

    try:
        return main(["train", *TINY_CLI, *argv])
    except SystemExit as exc:
        return exc.code


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdiff: error: "), err
    return err[0]


@pytest.fixture
def run_at_4(tmp_path, monkeypatch):
    """A fresh folder holding a finished 4-step run in ./run."""
    monkeypatch.chdir(tmp_path)
    assert _cli(["--out", "run", "--steps", "4"]) == 0
    return tmp_path / "run"


def test_cli_refuses_to_overwrite_a_run(run_at_4, capsys):
    before = _state(run_at_4 / "model")
    capsys.readouterr()
    assert _cli(["--out", "run", "--steps", "2"]) == 2
    assert _error(capsys) == ("fastdiff: error: run already holds a training run (at step 4); continue it with "
                              "--resume, replace it with --overwrite, or choose another --out")
    assert _equal(_state(run_at_4 / "model"), before)
    assert _cli(["--out", "run", "--steps", "2", "--resume", "--overwrite"]) == 2
    assert "exclude each other" in _error(capsys)
    # --overwrite: the old step folders go, the new run is complete on its own
    assert _cli(["--out", "run", "--steps", "2", "--overwrite"]) == 0
    assert sorted(os.listdir(run_at_4 / "checkpoints")) == ["latest", "step_000002"]
    assert json.loads((run_at_4 / "model" / "config.json").read_text())["training"]["steps"] == 2


def test_cli_resume_past_the_requested_steps_says_so(run_at_4, capsys):
    before = _state(run_at_4 / "model")
    capsys.readouterr()
    assert _cli(["--out", "run", "--steps", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already at step 4, past --steps 2: nothing trained" in out and "reached step 2" not in out
    assert _equal(_state(run_at_4 / "model"), before)
    assert _cli(["--out", "run", "--steps", "6", "--resume"]) == 0
    assert "reached step 6; this run (resumed from step 4)" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("latest", r"run/checkpoints/latest does not name a checkpoint \(step_NNNNNN\), it holds '\\x00garbage'"),
    ("json", r"cannot resume from run/checkpoints/step_000004/training_state\.json: Expecting"),
    ("json-list", r"cannot resume from run/checkpoints/step_000004/training_state\.json: not a fastdiff"),
    ("tensors", r"cannot resume from run/checkpoints/step_000004/training_state\.safetensors: .*truncated or corrupt"),
])
def test_cli_resume_names_the_damaged_file(run_at_4, capsys, damage, message):
    import re

    ckpt = run_at_4 / "checkpoints" / "step_000004"
    if damage == "latest":
        (run_at_4 / "checkpoints" / "latest").write_text("\x00garbage\n")
    elif damage == "json":
        (ckpt / "training_state.json").write_text("{")
    elif damage == "json-list":
        (ckpt / "training_state.json").write_text("[1, 2]")
    else:
        data = (ckpt / "training_state.safetensors").read_bytes()
        (ckpt / "training_state.safetensors").write_bytes(data[:len(data) // 3])
    capsys.readouterr()
    assert _cli(["--out", "run", "--steps", "6", "--resume"]) == 2
    line = _error(capsys)
    assert re.search(message, line), line


def test_stale_temporary_step_folders_are_removed_and_folders_follow_the_umask(run_at_4):
    import stat

    stale = run_at_4 / "checkpoints" / ".tmp-step_000006-abc123"
    stale.mkdir()
    (stale / "training_state.json").write_text("{")
    (run_at_4 / "checkpoints" / ".latest.abcd1234.tmp").write_text("step_0")
    (run_at_4 / "model" / ".model.safetensors.q1w2e3r4.tmp").write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        assert _cli(["--out", "run", "--steps", "6", "--resume"]) == 0
    finally:
        os.umask(old)
    names = os.listdir(run_at_4 / "checkpoints") + os.listdir(run_at_4 / "model")
    assert not [n for n in names if n.startswith(".")], names
    step = run_at_4 / "checkpoints" / "step_000006"
    assert stat.S_IMODE(os.stat(step).st_mode) == 0o755
    for path in (step / "training_state.safetensors", step / "training_state.json",
                 step / "model" / "model.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_cli_data_folder_with_a_file_that_is_not_an_image(tmp_path, monkeypatch, capsys):
    from fastdiff.images import save_images

    monkeypatch.chdir(tmp_path)
    save_images(torch.rand(2, 1, 8, 8) * 2 - 1, "imgs", range(2))
    (tmp_path / "imgs" / "notes.png").write_text("these are my notes")
    argv = ["--out", "run", "--steps", "1", "--data", "imgs"]
    assert _cli(argv) == 2
    assert "cannot read image 'imgs/notes.png'" in _error(capsys)
